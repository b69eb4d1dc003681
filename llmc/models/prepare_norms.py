"""Gemma's RMSNorms compute `norm(x) * (1 + w)`: a scale folded into `w` would not divide the
output. `offset_norm_steps` gives an adapter's `prepare` and `restore` steps: `prepare` swaps
each such norm (found by class name under the given roots) for a `DirectRMSNorm` whose weight
`w' = 1 + w` multiplies directly, with Gemma's arithmetic (normalize and multiply in float32,
cast back to the input's dtype; `w'` kept in float32, as Gemma computes `1 + w.float()`), so the
forward is bit-identical and scale folding exact; `restore` puts the original modules back with
`w' - 1` in their own dtype, for saving. A `DirectRMSNorm` also saves itself in the checkpoint's
layout (`w' - 1` under `weight`) for writers that read `state_dict()` without the adapter
(compressed-tensors, AutoAWQ, GPTQ exporters).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from llmc.models.adapter import get_submodule_or_none


class DirectRMSNorm(nn.Module):
    """`norm(x.float()) * weight` cast back to x's dtype; stands in for a `(1 + w)` norm."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.eps = float(original.eps)
        self.weight = nn.Parameter(1.0 + original.weight.detach().float(), requires_grad=False)
        object.__setattr__(self, "original", original)  # not a submodule: kept for `restore`
        self.register_state_dict_post_hook(_save_offset)
        self.register_load_state_dict_pre_hook(_load_offset)

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * self.weight.float()).type_as(x)

    def offset_weight(self) -> Tensor:
        """The checkpoint's `w = w' - 1`, in the original norm's dtype."""
        return (self.weight.detach().float() - 1.0).to(self.original.weight.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, from {type(self.original).__name__}"


def _save_offset(module: DirectRMSNorm, state: dict, prefix: str, local_metadata: dict) -> None:
    if prefix + "weight" in state:
        state[prefix + "weight"] = module.offset_weight()


def _load_offset(module: DirectRMSNorm, state: dict, prefix: str, *args) -> None:
    if prefix + "weight" in state:
        state[prefix + "weight"] = 1.0 + state[prefix + "weight"].float()


def _norms(model: nn.Module, roots: tuple[str, ...], match: Callable[[nn.Module], bool]):
    """(parent, attribute, module) of each module under `roots` that `match`es."""
    for root in roots:
        top = get_submodule_or_none(model, root)
        if top is None:
            continue
        if match(top):
            owner, _, attr = root.rpartition(".")
            yield model.get_submodule(owner) if owner else model, attr, top
            continue
        for name, module in list(top.named_modules()):
            if name and match(module):
                owner, _, attr = name.rpartition(".")
                yield top.get_submodule(owner) if owner else top, attr, module


def offset_norm_steps(class_names: tuple[str, ...], roots: tuple[str, ...]):
    """The `prepare` and `restore` steps for `(1 + w)` norms of the named classes under `roots`."""

    def prepare(model: nn.Module) -> None:
        for parent, attr, norm in list(_norms(model, roots, lambda m: type(m).__name__ in class_names)):
            setattr(parent, attr, DirectRMSNorm(norm))

    def restore(model: nn.Module, weight_of: Callable[[nn.Module], Tensor]) -> Callable[[], None]:
        swapped = []
        for parent, attr, direct in list(_norms(model, roots, lambda m: isinstance(m, DirectRMSNorm))):
            original = direct.original
            with torch.no_grad():
                original.weight.data = direct.offset_weight()
            setattr(parent, attr, original)
            swapped.append((parent, attr, direct))

        def undo() -> None:
            for parent, attr, direct in swapped:
                setattr(parent, attr, direct)

        return undo

    return prepare, restore
