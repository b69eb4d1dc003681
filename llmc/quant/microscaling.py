"""Microscaling formats: NVFP4, MXFP4 and MXFP8 fake quantization, with the interface of `IntQuantizer`.

Consecutive input features (of one weight row, or of one token) form groups that share a scale;
the values are FP4 E2M1 (0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives) or FP8 E4M3.

- NVFP4 (NVIDIA Blackwell): groups of 16, E2M1 values, one E4M3 scale per group and one FP32 global
  scale per tensor that brings the group scales into E4M3's range:
  `global = 448 * 6 / absmax(tensor)`, `scale = e4m3(absmax(group) / 6 * global)`,
  `value = e2m1(x / (scale / global)) * (scale / global)`.
- MXFP4 / MXFP8 (OCP Microscaling Formats v1.0; Rouhani et al., 2023, "Microscaling Data Formats
  for Deep Learning", arXiv:2310.10537): groups of 32, E2M1 / E4M3 values, one power-of-two E8M0
  scale per group, `2^(floor(log2 absmax) - emax)` (emax 2 for E2M1, 8 for E4M3), where absmax is
  first rounded up to the next power of two when its significand is 1.75 or more.

The arithmetic is compressed-tensors' (0.20: `generate_gparam`, `calculate_qparams`,
`generate_mx_scales`, `cast_to_fp4`), so its compressors recover llmc's codes exactly.

Parameters are `(scale, zero)`, `[rows, 1]`, as for the other quantizers. NVFP4: `scale` holds the
E4M3 group scales (as float32 values, which fp16/bf16 represent exactly) and, NVFP4 being symmetric,
`zero` carries the per-tensor global scale, repeated on every row. MX: `scale` is the power of two,
`zero` all zeros. Activations (`dynamic_groups`) get their group scales from every input; only
NVFP4's global scale is a parameter there (calibrated with `static: true`, else per input).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from llmc.errors import ModelError
from llmc.quant.fp8 import FP8_DTYPE, FP8_E4M3_MAX
from llmc.quant.observers import mse_search, observe_range
from llmc.quant.quantizer import QuantizerCommon, representable_scale

E2M1_MAX = 6.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
ELEMENT_MAX = {"e2m1": E2M1_MAX, "e4m3": FP8_E4M3_MAX}
MX_EMAX = {"e2m1": 2, "e4m3": 8}
"""floor(log2(largest value)) of each element format: the group's absmax maps near the top of its range."""
NVFP4_ZERO_SCALE = 0.125
"""compressed-tensors replaces a zero E4M3 group scale (an all-zero group) by this value."""


def round_e2m1(x: Tensor) -> Tensor:
    """The nearest E2M1 value of `x` (|x| <= 6), ties to even: the grid step is 0.5 below 2, 1 in
    [2, 4) and 2 in [4, 6], so rounding `x / step` to the nearest integer (half to even) is exact."""
    _, exponent = torch.frexp(x)  # |x| = m * 2^exponent, 0.5 <= m < 1
    step = torch.exp2((exponent - 2).clamp(min=-1).to(x.dtype))
    return torch.round(x / step) * step


def round_element(y: Tensor, element: str) -> Tensor:
    """`y` (already clamped to the element's range) rounded to E2M1 or E4M3, as float."""
    return round_e2m1(y) if element == "e2m1" else y.to(FP8_DTYPE).to(y.dtype)


def round_element_ste(y: Tensor, element: str) -> Tensor:
    """Rounded in the forward pass, identity gradient in the backward pass."""
    return (round_element(y.detach(), element) - y).detach() + y


def group_rows(x: Tensor, size: int, pad: bool, what: str) -> Tensor:
    """`x` as rows of `size` consecutive features; a last partial group is padded with zeros
    (which change no group's absmax) when `pad`, else refused."""
    extra = -x.shape[-1] % size
    if extra:
        if not pad:
            raise ModelError(f"{what} groups of {size} do not divide {x.shape[-1]} input features; leave this "
                             "linear in float (quant.ignored_layers) or use another format")
        x = F.pad(x, (0, extra))
    return x.reshape(-1, size)


def ungroup_rows(rows: Tensor, shape: torch.Size, size: int) -> Tensor:
    padded = shape[-1] + (-shape[-1] % size)
    return rows.reshape(*shape[:-1], padded)[..., : shape[-1]]


def _absmax(xmin: Tensor, xmax: Tensor) -> Tensor:
    return torch.maximum(xmax.float(), -xmin.float()).clamp(min=0)


@dataclass(frozen=True)
class NVFP4Quantizer(QuantizerCommon):
    calib_algo: str = "minmax"
    dynamic_groups: bool = False
    """Activations: group scales from every input (partial last groups padded); the global scale is the parameter."""
    global_scale: float | None = None
    """A fixed global scale (shared by linears a serving engine fuses, `tie_global_scale`); None: from the tensor."""
    bit: str = "e2m1"
    granularity: str = "per_group"
    group_size: int = 16
    symmetric: bool = True
    partial_group: bool = False
    mse_grid: int = 100
    mse_maxshrink: float = 0.8
    percentile: float = 99.9
    scale_dtype: torch.dtype | None = None
    """Kept for the common interface: E4M3 scales are exact in fp16 and bf16 already."""

    def __post_init__(self) -> None:
        if (self.bit, self.granularity, self.group_size, self.symmetric) != ("e2m1", "per_group", 16, True):
            raise ValueError("NVFP4 is symmetric e2m1 in groups of 16 (per_group)")
        self.check_calib_algo()

    @property
    def qmin(self) -> float:
        return -E2M1_MAX

    @property
    def qmax(self) -> float:
        return E2M1_MAX

    def rows(self, x: Tensor) -> Tensor:
        return group_rows(x, self.group_size, self.dynamic_groups, "NVFP4")

    def unrows(self, rows: Tensor, shape: torch.Size) -> Tensor:
        return ungroup_rows(rows, shape, self.group_size)

    def global_from_absmax(self, absmax: Tensor) -> Tensor:
        """The `[1, 1]` float32 global scale `448 * 6 / absmax` (1 where that overflows), or the fixed one."""
        if self.global_scale is not None:
            return torch.full((1, 1), self.global_scale, device=absmax.device)
        amax = absmax.max().clamp(min=torch.finfo(torch.float32).tiny)
        g = (FP8_E4M3_MAX * E2M1_MAX) / amax
        return torch.nan_to_num(g, nan=1.0, posinf=1.0, neginf=1.0).reshape(1, 1)

    def group_scales(self, absmax: Tensor, g: Tensor) -> Tensor:
        """E4M3 group scales `e4m3(absmax / 6 * g)` as float32 (straight-through), zero replaced by 0.125."""
        s = round_element_ste((absmax / E2M1_MAX * g).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX), "e4m3")
        return torch.where(s == 0, torch.full_like(s, NVFP4_ZERO_SCALE), s)

    def _params(self, xmin: Tensor, xmax: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        scale = self.group_scales(_absmax(xmin, xmax), g)
        return scale, g.expand_as(scale).clone()

    def params_from_range(self, xmin: Tensor, xmax: Tensor) -> tuple[Tensor, Tensor]:
        """Group scales and the global scale (repeated per row) for per-group ranges; the global one
        comes from the largest of the ranges (the tensor's) unless it is fixed."""
        return self._params(xmin, xmax, self.global_from_absmax(_absmax(xmin, xmax)))

    def calc_qparams(self, x: Tensor) -> tuple[Tensor, Tensor]:
        rows = self.rows(x.detach()).float()
        xmin, xmax = observe_range(rows, self.calib_algo, self.percentile)
        if self.calib_algo != "mse":
            return self.params_from_range(xmin, xmax)
        g = self.global_from_absmax(_absmax(xmin, xmax))  # fixed while the groups' ranges shrink
        return mse_search(rows, xmin, xmax, lambda lo, hi: self._params(lo, hi, g), self._qdq_rows,
                          self.mse_grid, self.mse_maxshrink)

    def _row_params(self, rows: Tensor, scale: Tensor, zero: Tensor) -> tuple[Tensor, Tensor]:
        if not self.dynamic_groups:
            return scale.float(), zero.float()
        g = zero.reshape(-1)[:1].reshape(1, 1).float()
        absmax = rows.detach().abs().amax(dim=1, keepdim=True)
        return self.group_scales(absmax, g), g

    def _qdq_rows(self, rows: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
        step = scale / zero  # compressed-tensors divides the group scale by the global one first
        return round_element_ste((rows / step).clamp(-E2M1_MAX, E2M1_MAX), "e2m1") * step

    def qdq_broadcast(self, x: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
        """Quantize-dequantize float32 `x` with params broadcast to it (each element's group's), in the
        arithmetic of `quant_dequant` (GPTQ's column sweep)."""
        return self._qdq_rows(x, scale, zero)

    def quantize(self, x: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
        """The E2M1 values (float32, -6..6) of `x`, same shape as `x`."""
        rows = self.rows(x).float()
        scale, zero = self._row_params(rows, scale, zero)
        return self.unrows(round_e2m1((rows / (scale / zero)).clamp(-E2M1_MAX, E2M1_MAX)), x.shape)

    def quant_dequant(self, x: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
        rows = self.rows(x).float()
        out = self._qdq_rows(rows, *self._row_params(rows, scale, zero))
        return self.unrows(out, x.shape).to(x.dtype)


@dataclass(frozen=True)
class MXQuantizer(QuantizerCommon):
    bit: str = "e2m1"
    """The element format: e2m1 (MXFP4) or e4m3 (MXFP8)."""
    calib_algo: str = "minmax"
    dynamic_groups: bool = False
    """Activations: partial last groups are padded (scales are computed from every input anyway)."""
    granularity: str = "per_group"
    group_size: int = 32
    symmetric: bool = True
    partial_group: bool = False
    mse_grid: int = 100
    mse_maxshrink: float = 0.8
    percentile: float = 99.9
    scale_dtype: torch.dtype | None = None
    """fp16/bf16: power-of-two scales are clamped into the dtype's range (see IntQuantizer.scale_dtype)."""

    def __post_init__(self) -> None:
        if self.bit not in MX_EMAX:
            raise ValueError(f"MX elements are e2m1 (MXFP4) or e4m3 (MXFP8), not {self.bit!r}")
        if (self.granularity, self.group_size, self.symmetric) != ("per_group", 32, True):
            raise ValueError("MX formats are symmetric, in groups of 32 (per_group)")
        self.check_calib_algo()

    @property
    def name(self) -> str:
        return "MXFP4" if self.bit == "e2m1" else "MXFP8"

    @property
    def qmin(self) -> float:
        return -ELEMENT_MAX[self.bit]

    @property
    def qmax(self) -> float:
        return ELEMENT_MAX[self.bit]

    def rows(self, x: Tensor) -> Tensor:
        return group_rows(x, self.group_size, self.dynamic_groups, self.name)

    def unrows(self, rows: Tensor, shape: torch.Size) -> Tensor:
        return ungroup_rows(rows, shape, self.group_size)

    def params_from_range(self, xmin: Tensor, xmax: Tensor) -> tuple[Tensor, Tensor]:
        """Power-of-two scales (float32 `[rows, 1]`) and all-zero zero points."""
        scale = representable_scale(mx_scale(_absmax(xmin, xmax), self.bit), self.scale_dtype)
        return scale, torch.zeros_like(scale)

    def _row_params(self, rows: Tensor, scale: Tensor, zero: Tensor) -> tuple[Tensor, Tensor]:
        if not self.dynamic_groups:
            return scale.float(), zero.float()
        absmax = rows.detach().abs().amax(dim=1, keepdim=True)
        return self.params_from_range(-absmax, absmax)

    def _qdq_rows(self, rows: Tensor, scale: Tensor, zero: Tensor | None = None) -> Tensor:
        return round_element_ste((rows / scale).clamp(self.qmin, self.qmax), self.bit) * scale

    def qdq_broadcast(self, x: Tensor, scale: Tensor, zero: Tensor | None = None) -> Tensor:
        """Quantize-dequantize float32 `x` with params broadcast to it, as `quant_dequant` (GPTQ's sweep)."""
        return self._qdq_rows(x, scale)

    def quantize(self, x: Tensor, scale: Tensor, zero: Tensor | None = None) -> Tensor:
        """The element values of `x`: float32 E2M1 values (MXFP4) or `torch.float8_e4m3fn` (MXFP8)."""
        rows = self.rows(x).float()
        scale, _ = self._row_params(rows, scale, torch.zeros_like(scale) if zero is None else zero)
        y = (rows / scale).clamp(self.qmin, self.qmax)
        codes = round_e2m1(y) if self.bit == "e2m1" else y.to(FP8_DTYPE)
        return self.unrows(codes, x.shape)

    def quant_dequant(self, x: Tensor, scale: Tensor, zero: Tensor | None = None) -> Tensor:
        rows = self.rows(x).float()
        scale, _ = self._row_params(rows, scale, torch.zeros_like(scale) if zero is None else zero)
        return self.unrows(self._qdq_rows(rows, scale), x.shape).to(x.dtype)


def mx_scale(absmax: Tensor, element: str) -> Tensor:
    """The E8M0 scale `2^(e - 127)` of each group, as float32. compressed-tensors' `generate_mx_scales`:
    absmax rounded to a power of two (up when its significand is >= 1.75: adding 2^21 to the float32
    bits carries into the exponent exactly then), minus the element's emax, biased by 127, in 0..255."""
    bits = absmax.float().contiguous().view(torch.int32)
    biased = ((bits + (1 << 21)) >> 23) & 0xFF  # biased exponent of the rounded power of two
    e8m0 = (biased - MX_EMAX[element]).clamp(0, 255)
    return torch.exp2((e8m0 - 127).double()).float()  # exact, 2^-127 included (a float32 subnormal)


def tie_global_scale(quantizer: object, weights: list[Tensor]) -> object:
    """For NVFP4, `quantizer` with one global scale for all `weights`, the largest tensor's (the
    smallest global scale): serving engines fuse the linears that share an input (q/k/v, gate/up) and
    keep one global scale for the fused weight (vLLM takes the max of the stored ones), as
    llm-compressor's fused-layer update does. Other quantizers come back unchanged."""
    if len(weights) < 2:
        return quantizer
    return fix_global_scale(quantizer, weights)


def fix_global_scale(quantizer: object, weights: list[Tensor]) -> object:
    """For NVFP4 weights, `quantizer` with the global scale of `weights` taken together fixed (kept if
    already fixed); GPTQ fixes it from the original weight before its sweep changes the columns. Other
    quantizers come back unchanged."""
    if not isinstance(quantizer, NVFP4Quantizer) or quantizer.dynamic_groups or quantizer.global_scale is not None:
        return quantizer
    amax = max(float(_absmax(*observe_range(quantizer.rows(w.detach()).float(), quantizer.calib_algo,
                                            quantizer.percentile)).max()) for w in weights)
    g = quantizer.global_from_absmax(torch.tensor([amax], dtype=torch.float32))
    return dataclasses.replace(quantizer, global_scale=float(g))
