"""Typed llmc configuration loaded from YAML."""

from llmc.config.loader import explain_validation_error, load_config
from llmc.config.schema import (
    ActQuantSection,
    CalibSection,
    EvalSection,
    LlmcConfig,
    ModelSection,
    QuantSection,
    SaveSection,
    WeightQuantSection,
)

__all__ = [
    "ActQuantSection",
    "CalibSection",
    "EvalSection",
    "LlmcConfig",
    "ModelSection",
    "QuantSection",
    "SaveSection",
    "WeightQuantSection",
    "explain_validation_error",
    "load_config",
]
