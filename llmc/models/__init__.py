"""Model adapters (declarations per family) and loading."""

from llmc.models import families  # noqa: F401  (registers the shipped adapters)
from llmc.models.adapter import LinearGroup, ModelAdapter
from llmc.models.loader import LoadedModel, load_model
from llmc.models.registry import ADAPTERS, adapter_names, get_adapter, register_adapter

__all__ = [
    "ADAPTERS",
    "LinearGroup",
    "LoadedModel",
    "ModelAdapter",
    "adapter_names",
    "get_adapter",
    "load_model",
    "register_adapter",
]
