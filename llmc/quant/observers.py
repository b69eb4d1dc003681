"""Range observers: how a quantizer picks the clipping range of each row that shares a scale.

One place for every range search, used by every quantizer (integer grids, FP8, and the
formats registered later):

- `minmax`: the row's min and max;
- `mse`: a grid search over shrink ratios of the min/max range that keeps, per row, the
  ratio with the lowest squared quantization error (ratio 1.0 is in the grid, so `mse`
  never does worse than `minmax`);
- `percentile`: the row's `p`-th and `(100 - p)`-th percentiles (outliers past them clip);
- `learnable`: OmniQuant's learnable weight clipping (`LearnableClip`), trained by a method
  that trains clipping; before training it is `minmax`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

OBSERVERS = ("minmax", "mse", "percentile", "learnable")

Params = tuple[Tensor, Tensor]


def observe_range(rows: Tensor, algo: str, percentile: float = 99.9) -> tuple[Tensor, Tensor]:
    """Per-row `[rows, 1]` (min, max) of float `rows` for `minmax`, `percentile` and `learnable`
    (its starting point; `mse` starts from here too)."""
    if algo == "percentile":
        q = torch.tensor([1 - percentile / 100, percentile / 100], device=rows.device, dtype=rows.dtype)
        lo, hi = torch.quantile(rows, q, dim=1, keepdim=True) if rows.shape[1] <= 2**24 else _chunked(rows, q)
        return lo, hi
    return rows.amin(dim=1, keepdim=True), rows.amax(dim=1, keepdim=True)


def _chunked(rows: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """torch.quantile refuses inputs of more than 2**24 elements per row: use kthvalue instead."""
    n = rows.shape[1]
    lo = rows.kthvalue(max(1, int(round(float(q[0]) * (n - 1))) + 1), dim=1, keepdim=True).values
    hi = rows.kthvalue(max(1, int(round(float(q[1]) * (n - 1))) + 1), dim=1, keepdim=True).values
    return lo, hi


def mse_search(
    rows: Tensor, xmin: Tensor, xmax: Tensor,
    params_from_range: Callable[[Tensor, Tensor], Params],
    qdq_rows: Callable[[Tensor, Tensor, Tensor], Tensor],
    grid: int = 100, maxshrink: float = 0.8,
) -> Params:
    """Per row, the (scale, zero) of the shrunk range `ratio * [xmin, xmax]` with the lowest squared
    error of `qdq_rows(rows, scale, zero)` over ratios 1, 1 - 1/grid, ... down to 1 - maxshrink."""
    best_scale, best_zero = params_from_range(xmin, xmax)
    best_err = (qdq_rows(rows, best_scale, best_zero) - rows).pow(2).sum(dim=1, keepdim=True)
    for i in range(1, int(maxshrink * grid) + 1):
        ratio = 1 - i / grid
        scale, zero = params_from_range(xmin * ratio, xmax * ratio)
        err = (qdq_rows(rows, scale, zero) - rows).pow(2).sum(dim=1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


class LearnableClip(nn.Module):
    """Learnable clipping of a range (OmniQuant's LWC, Shao et al., 2023, arXiv:2308.13137, Eq. 2):
    per row, `max * sigmoid(gamma)` and `min * sigmoid(beta)`, both logits starting at `init`
    (sigmoid(4) = 0.982, the paper's code). With `rows=1` one pair of logits is shared by every row
    (activations: one clipping ratio applied to each token's own range)."""

    def __init__(self, rows: int, init: float = 4.0, device: torch.device | None = None) -> None:
        super().__init__()
        self.upper = nn.Parameter(torch.full((rows, 1), init, device=device))
        self.lower = nn.Parameter(torch.full((rows, 1), init, device=device))

    def forward(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        xmin, xmax = rows.amin(dim=1, keepdim=True), rows.amax(dim=1, keepdim=True)
        return xmin * torch.sigmoid(self.lower), xmax * torch.sigmoid(self.upper)
