"""Tiny random models of every supported family, for the conformance test (tests/test_families.py).

Each module here defines `ZOO`, a list of `TinyModel`s; a new family adds one entry (or one
module). Models are built from their transformers config class: 2-3 layers, small widths.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class TinyModel:
    id: str
    """Test id (usually the transformers model_type)."""
    adapter: str
    """The adapter `model.type: auto` must pick."""
    config: Callable[[int], object]
    """Builds the transformers config for a vocabulary size."""
    auto_class: str = "AutoModelForCausalLM"
    """The transformers Auto class the saved folders reload with."""
    group_size: int = 32
    """Weight quantization group size (divides every quantized linear's input width)."""
    build: Callable[[object], torch.nn.Module] | None = None
    """Builds the model from the config (default: `auto_class.from_config`)."""
    skip: dict[str, str] = field(default_factory=dict)
    """Checks not run for this family, with the reason (keys: smoothquant, awq, ct_export...)."""


def all_models() -> list[TinyModel]:
    models = []
    for module in pkgutil.iter_modules(__path__):
        models.extend(importlib.import_module(f"{__name__}.{module.name}").ZOO)
    return sorted(models, key=lambda m: m.id)
