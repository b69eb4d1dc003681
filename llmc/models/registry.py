"""Adapters keyed by llmc's type names, with auto-detection from `config.model_type`."""

from __future__ import annotations

from llmc.errors import ModelError
from llmc.models.adapter import ModelAdapter

ADAPTERS: dict[str, ModelAdapter] = {}


def register_adapter(adapter: ModelAdapter) -> ModelAdapter:
    for key in (adapter.name, *adapter.aliases):
        ADAPTERS[key.lower()] = adapter
    return adapter


def adapter_names() -> list[str]:
    return sorted({a.name for a in ADAPTERS.values()} | {n for a in ADAPTERS.values() for n in a.aliases})


def get_adapter(type_name: str, model_type: str | None = None) -> ModelAdapter:
    """The adapter for llmc's `model.type` (or `auto`: by the HF config's `model_type`)."""
    if type_name.lower() != "auto":
        adapter = ADAPTERS.get(type_name.lower())
        if adapter is None:
            raise ModelError(
                f"no adapter for model type {type_name!r}; use one of {', '.join(adapter_names())} "
                f"or auto (or add an adapter in llmc/models/)"
            )
        return adapter
    for adapter in {id(a): a for a in ADAPTERS.values()}.values():
        if model_type in adapter.model_types:
            return adapter
    raise ModelError(
        f"unsupported architecture: model_type {model_type!r} has no adapter; supported model types: "
        f"{', '.join(sorted({t for a in ADAPTERS.values() for t in a.model_types}))} "
        f"(add an adapter in llmc/models/ to support it)"
    )
