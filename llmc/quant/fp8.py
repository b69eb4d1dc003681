"""FP8 (e4m3) fake quantization, with the same interface as `IntQuantizer`.

A value is divided by its row's scale, clamped to +-448 (the largest finite e4m3 number)
and cast to `torch.float8_e4m3fn` (round to nearest even), then multiplied back by the
scale. The scale is `absmax / 448` per tensor, per output channel (weights) or per token
(activations), so the largest magnitude of each row maps to 448; there is no zero point
(`zero` is all zeros and only kept so callers can treat both quantizers alike). Ranges come
from an observer of `llmc.quant.observers` (minmax, mse, percentile), as for the integer quantizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from llmc.quant.quantizer import QuantizerCommon, representable_scale

FP8_E4M3_MAX = 448.0
FP8_DTYPE = torch.float8_e4m3fn


def ste(q: Tensor, x: Tensor) -> Tensor:
    """`q` in the forward pass, identity gradient to `x` in the backward pass."""
    return (q - x).detach() + x


def e4m3_params(xmin: Tensor, xmax: Tensor, scale_dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
    """Scale (`absmax / 448`, representable in `scale_dtype`) and an all-zero zero point, both `[rows, 1]` float32."""
    absmax = torch.maximum(xmax.float(), -xmin.float()).clamp(min=0)
    scale = (absmax / FP8_E4M3_MAX).clamp(min=torch.finfo(torch.float32).tiny * 1e3)
    scale = representable_scale(scale, scale_dtype)
    return scale, torch.zeros_like(scale)


@dataclass(frozen=True)
class FP8Quantizer(QuantizerCommon):
    granularity: str
    calib_algo: str = "minmax"
    bit: str = "e4m3"
    symmetric: bool = True
    """Always True: e4m3 is a signed format without a zero point."""
    group_size: int = -1
    partial_group: bool = False
    mse_grid: int = 100
    mse_maxshrink: float = 0.8
    percentile: float = 99.9
    scale_dtype: torch.dtype | None = None
    """fp16/bf16: scales are rounded to this dtype (see IntQuantizer.scale_dtype)."""

    def __post_init__(self) -> None:
        if self.bit != "e4m3":
            raise ValueError(f"float quantization supports bit e4m3, not {self.bit!r}")
        if self.granularity not in ("per_tensor", "per_channel", "per_token"):
            raise ValueError(f"FP8 quantization supports per_tensor, per_channel and per_token, not {self.granularity!r}")
        self.check_calib_algo()
        if not self.symmetric:
            raise ValueError("FP8 quantization is symmetric")

    @property
    def qmin(self) -> float:
        return -FP8_E4M3_MAX

    @property
    def qmax(self) -> float:
        return FP8_E4M3_MAX

    def rows(self, x: Tensor) -> Tensor:
        """View `x` as 2-D rows, each row sharing one scale."""
        if self.granularity == "per_tensor":
            return x.reshape(1, -1)
        return x.reshape(-1, x.shape[-1])

    def unrows(self, rows: Tensor, shape: torch.Size) -> Tensor:
        return rows.reshape(shape)

    def params_from_range(self, xmin: Tensor, xmax: Tensor) -> tuple[Tensor, Tensor]:
        return e4m3_params(xmin, xmax, self.scale_dtype)

    def _codes(self, rows: Tensor, scale: Tensor) -> Tensor:
        return (rows / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE)

    def _qdq_rows(self, rows: Tensor, scale: Tensor, zero: Tensor | None = None) -> Tensor:
        return ste(self._codes(rows, scale).float() * scale, rows)

    def quantize(self, x: Tensor, scale: Tensor, zero: Tensor | None = None) -> Tensor:
        """The e4m3 values (`torch.float8_e4m3fn`) of `x / scale`, same shape as `x`."""
        return self.unrows(self._codes(self.rows(x).float(), scale.float()), x.shape)

    def quant_dequant(self, x: Tensor, scale: Tensor, zero: Tensor | None = None) -> Tensor:
        """Fake-quantize `x` with a given scale; same shape and dtype as `x`."""
        out = self._qdq_rows(self.rows(x).float(), scale.float())
        return self.unrows(out, x.shape).to(x.dtype)
