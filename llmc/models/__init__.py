"""Model adapters (declarations per family) and loading."""

from llmc.models import families  # noqa: F401  (registers the shipped adapters)
from llmc.models.adapter import BlockRoles, LinearGroup, ModelAdapter, ModelRoles
from llmc.models.loader import LoadedModel, load_model
from llmc.models.registry import ADAPTERS, adapter_names, get_adapter, register_adapter

__all__ = [
    "ADAPTERS",
    "BlockRoles",
    "LinearGroup",
    "LoadedModel",
    "ModelAdapter",
    "ModelRoles",
    "adapter_names",
    "get_adapter",
    "load_model",
    "register_adapter",
]
