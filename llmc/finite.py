"""NaN/Inf checks on weights: a non-finite weight is never quantized nor saved silently.

`check_block_weights` runs per block before the first method processes it (from
`llmc.schedule.compress_batches`), `check_model_weights` on the whole model's state, the
fake-quantized weights included, just before outputs are written (from `llmc.runner`). Both
cost one `torch.isfinite(t).all()` per tensor; the first non-finite tensor is named.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from llmc.errors import NumericsError

FIX = (
    "the checkpoint is corrupt or overflowed its dtype: re-download or re-export it (if it overflowed "
    "float16, load it with model.torch_dtype: float32)"
)


def first_nonfinite(named: Iterable[tuple[str, Tensor]]) -> tuple[str, int] | None:
    """The first (name, count of NaN/Inf values) among floating-point tensors, or None if all are finite."""
    for name, t in named:
        if t is None or not torch.is_floating_point(t) or t.is_meta or t.numel() == 0:
            continue
        t = t.detach()
        if not bool(torch.isfinite(t).all()):
            return name, int((~torch.isfinite(t)).sum())
    return None


def _raise(found: tuple[str, int] | None, when: str) -> None:
    if found is not None:
        name, count = found
        raise NumericsError(f"{name} has {count} NaN/Inf value(s) {when}; {FIX}")


def _named_tensors(module: nn.Module, prefix: str) -> Iterator[tuple[str, Tensor]]:
    dot = f"{prefix}." if prefix else ""
    for name, p in module.named_parameters():
        yield dot + name, p
    for name, b in module.named_buffers():
        yield dot + name, b


def check_block_weights(block: nn.Module, prefix: str) -> None:
    """Refuse a block whose parameters or buffers hold NaN/Inf (`prefix`: its name in the model,
    e.g. `model.layers.3`), before any method quantizes or prunes it."""
    _raise(first_nonfinite(_named_tensors(block, prefix)), "before quantization")


def model_state(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The model's state dict, then the fake-quantized weight (and its quantization parameters)
    of every fake-quant linear: everything a save may write."""
    from llmc.quant.fake_linear import fake_quant_modules

    yield from model.state_dict(keep_vars=True).items()
    for name, module in fake_quant_modules(model):
        for key in ("w_scale", "w_zero", "a_scale", "a_zero"):
            yield f"{name}.{key}", getattr(module, key)
        if module.weight.is_meta:
            continue
        with torch.no_grad():
            yield f"{name}.weight (fake-quantized)", module.fake_weight()


def check_model_weights(model: nn.Module) -> None:
    """Refuse to save a model whose state (fake-quantized weights included) holds NaN/Inf."""
    _raise(first_nonfinite(model_state(model)), "in the model to be saved (nothing was written)")
