"""How sparse a weight matrix is: its zeros and whether they follow an N:M pattern.

Shared by the compressed-tensors export (which checks a claimed 2:4 pattern against the weights
it writes) and `llmc inspect` (which reports the zeros of every linear of a saved folder). A
weight `[out, in]` follows N:M when every M consecutive inputs of each row hold at least N zeros
(weights that happen to be zero make a group sparser, never break it), as sparse tensor cores
and compressed-tensors' `tensor_follows_mask_structure` read it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def short_groups(zero: Tensor, n: int, m: int) -> Tensor | None:
    """Bool `[out, in / m]`: the groups of `m` inputs with fewer than `n` zeros (`zero` is `weight == 0`);
    None when the width is not a multiple of `m`."""
    rows, cols = zero.shape[0], zero.shape[-1]
    if zero.dim() != 2 or cols % m:
        return None
    return zero.reshape(rows, cols // m, m).sum(dim=-1, dtype=torch.int16) < n


def n_m_violation(weight: Tensor, n: int, m: int) -> tuple[int, int] | None:
    """(row, first column) of the first group of `m` inputs with fewer than `n` zeros, or None.

    A width not divisible by `m` is reported as (0, width): the pattern cannot hold.
    """
    short = short_groups(weight == 0, n, m)
    if short is None:
        return 0, weight.shape[-1]
    if not bool(short.any()):
        return None
    row, group = (int(i) for i in short.nonzero()[0])
    return row, group * m


def follows_n_m(weight: Tensor, n: int = 2, m: int = 4) -> bool:
    return n_m_violation(weight, n, m) is None


@dataclass(frozen=True)
class LayerSparsity:
    name: str
    zeros: int
    numel: int
    two_four: bool
    """Every 4 consecutive inputs of each row hold at least 2 zeros."""

    @property
    def fraction(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


def measure(name: str, weight: Tensor) -> LayerSparsity:
    zero = weight == 0
    short = short_groups(zero, 2, 4)
    return LayerSparsity(name, int(torch.count_nonzero(zero)), weight.numel(), short is not None and not bool(short.any()))


def total(layers: list[LayerSparsity]) -> tuple[int, int, int]:
    """(zeros, weights, layers that are 2:4) over `layers`."""
    return sum(s.zeros for s in layers), sum(s.numel for s in layers), sum(s.two_four for s in layers)
