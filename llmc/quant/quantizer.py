"""Integer fake quantization: ranges, quantize-dequantize, and a straight-through estimator.

Weights are 2-D `[out_features, in_features]`; granularity picks the rows that share one
scale: `per_tensor` (one), `per_channel` (one per output row), `per_group` (`group_size`
consecutive input features of one row). Activations `[..., features]` use `per_token`
(one per token) or `per_tensor`. Ranges come from an observer of `llmc.quant.observers`
(`calib_algo`: minmax, mse, percentile, learnable). Rounding goes through the straight-through
estimator everywhere, so a method may train scales, clipping or transforms through it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from llmc.quant.observers import OBSERVERS, mse_search, observe_range

HALF_DTYPES = (torch.float16, torch.bfloat16)


def representable_scale(scale: Tensor, dtype: torch.dtype | None) -> Tensor:
    """`scale` rounded to a nonzero finite value of `dtype` when that is fp16 or bf16 (same tensor dtype)."""
    if dtype not in HALF_DTYPES:
        return scale
    info = torch.finfo(dtype)
    return scale.clamp(info.tiny, info.max).to(dtype).to(scale.dtype)


def round_ste(x: Tensor) -> Tensor:
    """Round in the forward pass, identity gradient in the backward pass."""
    return (x.round() - x).detach() + x


class QuantizerCommon:
    """What every quantizer dataclass shares (its fields: `calib_algo`, `scale_dtype`; the rest of the
    interface is in `llmc.quant.registry`)."""

    def for_dtype(self, dtype: torch.dtype):
        """This quantizer with scales representable in `dtype` (a weight's dtype: fp16/bf16, else float32)."""
        wanted = dtype if dtype in HALF_DTYPES else None
        return self if wanted == self.scale_dtype else dataclasses.replace(self, scale_dtype=wanted)

    def check_calib_algo(self) -> None:
        if self.calib_algo not in OBSERVERS:
            raise ValueError(f"unknown calib_algo {self.calib_algo!r}; use one of {', '.join(OBSERVERS)}")

    def calc_qparams(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Scale and zero point for `x` (computed in float32), shaped `[rows, 1]`, with the `calib_algo` range."""
        rows = self.rows(x.detach()).float()
        xmin, xmax = observe_range(rows, self.calib_algo, self.percentile)
        if self.calib_algo != "mse":
            return self.params_from_range(xmin, xmax)
        return mse_search(rows, xmin, xmax, self.params_from_range, self._qdq_rows, self.mse_grid, self.mse_maxshrink)

    def fake_quant(self, x: Tensor) -> Tensor:
        """Quantize-dequantize `x` with parameters computed from `x` itself."""
        return self.quant_dequant(x, *self.calc_qparams(x))


@dataclass(frozen=True)
class IntQuantizer(QuantizerCommon):
    bit: int
    symmetric: bool
    granularity: str
    group_size: int = -1
    calib_algo: str = "minmax"
    partial_group: bool = False
    """per_group only: allow a last group narrower than group_size when it does not divide the features."""
    mse_grid: int = 100
    mse_maxshrink: float = 0.8
    percentile: float = 99.9
    """calib_algo percentile: the upper percentile kept (the lower one is 100 - percentile)."""
    sym_scale: str = "qmax"
    """Symmetric scale: `absmax / qmax` (qmax, llmc's: /7 at 4 bits) or `absmax / ((qmax - qmin) / 2)`
    (half_range, compressed-tensors' and llm-compressor's: /7.5 at 4 bits, so the negative extreme uses
    code -8 and the positive one clips to 7)."""
    scale_dtype: torch.dtype | None = None
    """fp16/bf16: scales are rounded to this dtype (the model's), so a checkpoint that stores them in
    it dequantizes to exactly the fake-quantized weight; None keeps float32 scales."""

    def __post_init__(self) -> None:
        if not 2 <= self.bit <= 8:
            raise ValueError(f"bit={self.bit} is outside 2..8")
        if self.granularity not in ("per_tensor", "per_channel", "per_group", "per_token"):
            raise ValueError(f"unknown granularity {self.granularity!r}")
        if self.granularity == "per_group" and self.group_size < 1:
            raise ValueError("per_group needs group_size >= 1")
        if self.sym_scale not in ("qmax", "half_range"):
            raise ValueError(f"unknown sym_scale {self.sym_scale!r}; use qmax or half_range")
        self.check_calib_algo()

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bit - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bit - 1) - 1 if self.symmetric else 2**self.bit - 1

    def rows(self, x: Tensor) -> Tensor:
        """View `x` as 2-D rows, each row sharing one scale."""
        if self.granularity == "per_tensor":
            return x.reshape(1, -1)
        if self.granularity == "per_group":
            pad = -x.shape[-1] % self.group_size
            if pad:
                if not self.partial_group:
                    raise ValueError(f"group_size {self.group_size} does not divide {x.shape[-1]} input features")
                # Repeating the last column leaves each group's min and max unchanged.
                x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)
            return x.reshape(-1, self.group_size)
        return x.reshape(-1, x.shape[-1])

    def unrows(self, rows: Tensor, shape: torch.Size) -> Tensor:
        """Inverse of `rows`: drop the padding of a partial last group and restore `shape`."""
        if self.granularity == "per_group" and shape[-1] % self.group_size:
            padded = shape[-1] + (-shape[-1] % self.group_size)
            return rows.reshape(*shape[:-1], padded)[..., : shape[-1]]
        return rows.reshape(shape)

    def params_from_range(self, xmin: Tensor, xmax: Tensor) -> tuple[Tensor, Tensor]:
        """Scale and zero point (both `[rows, 1]`, float) for per-row ranges."""
        xmin = torch.minimum(xmin, torch.zeros_like(xmin))
        xmax = torch.maximum(xmax, torch.zeros_like(xmax))
        tiny = torch.finfo(torch.float32).tiny * 1e3
        if self.symmetric:
            absmax = torch.maximum(xmax, -xmin)
            steps = self.qmax if self.sym_scale == "qmax" else (self.qmax - self.qmin) / 2
            scale = representable_scale((absmax / steps).clamp(min=tiny), self.scale_dtype)
            zero = torch.zeros_like(scale)
        else:
            scale = representable_scale(((xmax - xmin) / self.qmax).clamp(min=tiny), self.scale_dtype)
            zero = round_ste(-xmin / scale).clamp(self.qmin, self.qmax)
        return scale, zero

    def _qdq_rows(self, rows: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
        q = torch.clamp(round_ste(rows / scale) + zero, self.qmin, self.qmax)
        return (q - zero) * scale

    def quantize(self, x: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
        """Integer codes (int32) of `x`, same shape as `x`."""
        rows = self.rows(x).float()
        q = torch.clamp((rows / scale).round() + zero, self.qmin, self.qmax).to(torch.int32)
        return self.unrows(q, x.shape)

    def quant_dequant(self, x: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
        """Fake-quantize `x` with given parameters; same shape and dtype as `x`."""
        out = self._qdq_rows(self.rows(x).float(), scale.float(), zero.float())
        return self.unrows(out, x.shape).to(x.dtype)
