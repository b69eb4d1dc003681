"""Dual-grained integer weights (DGQ): 4-bit codes, int8 group scales, one float scale per channel.

Luoming Zhang et al., 2023, "Dual Grained Quantization: Efficient Fine-Grained Quantization for LLM",
arXiv:2310.04836. A weight row `o` has one float scale `c_o` (coarse grain) and, per
group `g` of input features, an integer group scale `k_og` in 1..127 (fine grain) and a zero point
`z_og`; a weight is
    w = c_o * (k_og * (q - z_og)),   q the 4-bit code,
and `k_og * (q - z_og)` is an int8 value: the codes are clamped per group to `|q - z| <= 127 // k`,
so a kernel dequantizes int4 to int8 with integer arithmetic and runs an int8 GEMM against int8
activations, applying `c_o` (and the activation's scale) once per output.

Parameters: `scale` is `[rows, 2]` (column 0: the channel scale `c_o` of the row's channel, column 1:
the group scale `k_og`, an integer stored as float, exact in fp16/bf16), `zero` `[rows, 1]`; rows are
the groups (`rows` of `IntQuantizer` per_group). Ranges: per group from the observer (minmax or
percentile), `k = round(s_group / c)` clamped to 1..127, with `c = ratio * absmax(row) / 127`
(`channel_params`; DGQ's second search phase picks `ratio` per row), then the zero point is recomputed
for the final step `c * k`. No other toolkit format stores this layout, so it is fake-quantized only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from llmc.quant.observers import observe_range
from llmc.quant.quantizer import IntQuantizer, representable_scale, round_ste


@dataclass(frozen=True)
class DualGrainedQuantizer(IntQuantizer):
    scale_bit: int = 8
    """Bits of the integer group scales and of their products with the codes (int8)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.granularity != "per_group":
            raise ValueError("dual-grained weights are per_group (the fine grain) under per-channel scales")
        if self.calib_algo not in ("minmax", "percentile"):
            raise ValueError("dual-grained ranges come from minmax or percentile")

    @property
    def int_max(self) -> int:
        return 2 ** (self.scale_bit - 1) - 1

    def groups_per_row(self, shape: torch.Size) -> int:
        return -(-shape[-1] // self.group_size)

    def float_params(self, xmin: Tensor, xmax: Tensor) -> tuple[Tensor, Tensor]:
        """Plain per-group float scales and zero points (`IntQuantizer`'s) for group ranges."""
        return IntQuantizer.params_from_range(self, xmin, xmax)

    def float_qdq(self, rows: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
        return IntQuantizer._qdq_rows(self, rows, scale, zero)

    def channel_params(self, x: Tensor, ratio: Tensor | float = 1.0,
                       clip: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """`(scale [rows, 2], zero [rows, 1])` for weight `x` `[out, in]`, the channel scale shrunk by
        `ratio` (a number, or `[out, 1]`), each group's range by `clip` (`[rows, 1]`, optional)."""
        rows = self.rows(x.detach()).float()
        xmin, xmax = observe_range(rows, self.calib_algo, self.percentile)
        if clip is not None:
            xmin, xmax = xmin * clip, xmax * clip
        group_scale, _ = self.float_params(xmin, xmax)
        n = self.groups_per_row(x.shape)
        absmax = rows.abs().reshape(-1, n * self.group_size).amax(dim=1, keepdim=True)
        tiny = torch.finfo(torch.float32).tiny * 1e3
        channel = representable_scale((absmax * ratio / self.int_max).clamp(min=tiny), self.scale_dtype)
        channel = channel.repeat_interleave(n, dim=0)  # one row per group
        k = (group_scale / channel).round().clamp(1, self.int_max)
        step = channel * k
        if self.symmetric:
            zero = torch.zeros_like(step)
        else:
            zero = (-torch.minimum(xmin, torch.zeros_like(xmin)) / step).round().clamp(self.qmin, self.qmax)
        return torch.cat([channel, k], dim=1), zero

    def calc_qparams(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.channel_params(x)

    def params_from_range(self, xmin: Tensor, xmax: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError("dual-grained scales need the whole row (channel_params), not per-group ranges")

    def bounds(self, k: Tensor, zero: Tensor) -> tuple[Tensor, Tensor]:
        """Per group, the codes whose `k * (q - z)` fits the int8 range."""
        lim = torch.floor(self.int_max / k)
        return (zero - lim).clamp(min=self.qmin), (zero + lim).clamp(max=self.qmax)

    def _qdq_rows(self, rows: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
        channel, k = scale[:, :1], scale[:, 1:2]
        lo, hi = self.bounds(k, zero)
        q = torch.clamp(round_ste(rows / (channel * k)) + zero, lo, hi)
        return ((q - zero) * k) * channel

    def quantize(self, x: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
        """The 4-bit codes q (int32), same shape as `x`."""
        scale, zero = scale.float(), zero.float()
        channel, k = scale[:, :1], scale[:, 1:2]
        lo, hi = self.bounds(k, zero)
        q = torch.clamp((self.rows(x).float() / (channel * k)).round() + zero, lo, hi).to(torch.int32)
        return self.unrows(q, x.shape)

    def int8_values(self, x: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
        """`k * (q - z)` per weight (int32, within +-int_max): what the int8 GEMM multiplies."""
        codes = self.rows(self.quantize(x, scale, zero)).float()
        return self.unrows((scale[:, 1:2].float() * (codes - zero.float())).to(torch.int32), x.shape)


def dual_grained(q: IntQuantizer, scale_bit: int = 8) -> DualGrainedQuantizer:
    """The dual-grained variant of integer weight quantizer `q` (its bits, group size, symmetry, range)."""
    fields = {f.name: getattr(q, f.name) for f in dataclasses.fields(IntQuantizer)}
    return DualGrainedQuantizer(**fields, scale_bit=scale_bit)
