"""HQQ: half-quadratic quantization, data-free (reads no calibration data).

Badri & Shaji, 2023, "Half-Quadratic Quantization of Large Machine Learning Models", Mobius Labs
blog post (https://mobiusml.github.io/hqq_blog/; no arXiv paper), code in the hqq library
(https://github.com/mobiusml/hqq, `hqq/core/optimize.py`); also in ModelTC/llmc (`HQQ`).

Per target linear, starting from the asymmetric min/max group parameters (scale s, zero z; the
range from `quant.weight.calib_algo`), the zero point is fitted to the weight alone by minimising
the lp-norm (p < 1, robust to the few large errors of outliers) of the weight error
`W - (round(W/s + z) - z) s`. Half-quadratic splitting adds an error variable E and alternates,
with a penalty beta that grows by kappa per step:
  1. E = shrink_p(W - W_r): the proximal step of |.|^p, `sign(x) relu(|x| - |x|^(p-1) / beta)`;
  2. z = mean over the group of `q - (W - E) / s`: the closed-form zero for that E.
With `early_stop` the loop ends at the first step whose mean |W - W_r| (the whole linear) does
not improve, keeping the best zero seen (hqq's v2 loop; hqq's default loop keeps the following,
unscored zero instead). Then, per group, the fitted parameters are kept only where their lp
objective is below that of the starting min/max parameters (hqq has no such guard; without it a
few groups ended worse than RTN). Everything runs in float32 on the block's device (hqq: float16
on CUDA). `optimize_scale` first searches each group's scale on a grid of 129 points within +-5%
(hqq's `scale_gridsearch` fixes the codes and searches +-5% of the mean scale of the whole tensor,
scored by L1; here the codes follow the scale and the score is the lp objective).

The zero point is a float: codes are `round(W/s + z)` and the weight `(code - z) s`
(`HQQQuantizer`). Rounded to an integer (`round_zero: true`: per group the better of floor and
ceil of the fitted zero), it gives RTN's weights back, since the fit moves each zero by less than
half a step. Measured (lp objective / MSE of the weight, relative to RTN's; W4 and W3, g64):
  Student-t(3) 512x1024:   float zero 0.944/0.896, 0.950/0.914; + optimize_scale 0.936/0.877,
                           0.934/0.866; round_zero 1.000/1.000 both; round_zero + optimize_scale
                           0.988/0.980, 0.978/0.944;
  SmolLM2-135M, 42 linears: float zero 0.720/0.610 (its weights come from a Q4_1 GGUF, already on a
                           4-bit grid with float offsets), 0.949/0.888; round_zero + optimize_scale
                           0.989/0.981, 0.980/0.952.
So the float zero is the default (as in hqq, and llmc's HQQ config, `round_zp: False`), and the
real-quantized formats that store integer zero points (compressed-tensors, AutoAWQ, MLC-LLM, GPTQ)
are refused before calibration; save_trans and save_fake work. With `round_zero: true` every
format that takes the config works (bit-equal: the layers use the plain `IntQuantizer`), and
pruned weights stay zero (a float zero would make them nonzero, so a sparse run needs round_zero).

Config keys (llmc's names; llmc's `quant.weight.round_zp` is accepted and sets `round_zero`):
`quant.weight.{bit, group_size, granularity, calib_algo}` with `symmetric: false` (HQQ fits the
zero point); `quant.act.*` optional; `quant.special`:
  axis (1): 1 groups along the input features (the quantizer's groups, exportable); 0 groups
    `group_size` consecutive output rows of each input column, as llmc's `axis: 0` (fake only).
  lp_norm (0.7, in (0, 1]), beta (10.0), kappa (1.01, >= 1), iters (20): the solver's settings.
  early_stop (true): stop when the mean absolute error no longer falls.
  optimize_scale (false): the scale grid search before the zero fit.
  round_zero (false): round the fitted zero to an integer (exportable; equals RTN, see above).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from llmc.config.schema import QuantSection
from llmc.errors import ConfigError, ModelError
from llmc.methods.base import QuantMethod, register_method
from llmc.methods.sparse_base import is_pruned
from llmc.models.adapter import ModelAdapter
from llmc.pipeline.blockwise import BlockContext
from llmc.quant.fake_linear import FakeQuantLinear
from llmc.quant.observers import observe_range
from llmc.quant.quantizer import IntQuantizer, representable_scale, round_ste

log = logging.getLogger("llmc")

INTEGER_ZERO_FORMATS = {"save_vllm": "vLLM (compressed-tensors)", "save_sgl": "SGLang (compressed-tensors)",
                        "save_autoawq": "AutoAWQ", "save_mlcllm": "MLC-LLM", "save_gptq": "GPTQ"}
SCALE_GRID = 129
"""Odd, so the starting scale is one of the candidates (as hqq's grid)."""
SCALE_RANGE = 0.05


class HQQSpecial(BaseModel):
    model_config = ConfigDict(extra="forbid")

    axis: Literal[0, 1] = Field(1, description="1: groups along the input features; 0: along the output rows.")
    lp_norm: float = Field(0.7, gt=0.0, le=1.0, description="p of the lp-norm of the weight error (p <= 1).")
    beta: float = Field(10.0, gt=0.0, description="Starting half-quadratic penalty.")
    kappa: float = Field(1.01, ge=1.0, description="Growth of beta per iteration.")
    iters: int = Field(20, ge=1, description="Iterations of the zero-point fit.")
    early_stop: bool = Field(True, description="Stop when the mean absolute weight error stops falling.")
    optimize_scale: bool = Field(False, description="Grid-search each group's scale (+-5%) before the zero fit.")
    round_zero: bool = Field(False, description="Round the fitted zero point to an integer (exportable).")


@dataclass(frozen=True)
class HQQQuantizer(IntQuantizer):
    """An `IntQuantizer` whose zero point may be a float, inside the rounding: codes
    `round(x / s + z)`; and whose groups may run along the output rows (`axis=0`)."""

    axis: int = 1
    float_zero: bool = True

    def rows(self, x: Tensor) -> Tensor:
        return super().rows(x.transpose(-2, -1) if self.axis == 0 else x)

    def unrows(self, rows: Tensor, shape: torch.Size) -> Tensor:
        if self.axis == 0:
            return super().unrows(rows, torch.Size((*shape[:-2], shape[-1], shape[-2]))).transpose(-2, -1)
        return super().unrows(rows, shape)

    def _qdq_rows(self, rows: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
        if not self.float_zero:
            return super()._qdq_rows(rows, scale, zero)
        q = torch.clamp(round_ste(rows / scale + zero), self.qmin, self.qmax)
        return (q - zero) * scale

    def quantize(self, x: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
        if not self.float_zero:
            return super().quantize(x, scale, zero)
        q = torch.clamp((self.rows(x).float() / scale + zero).round(), self.qmin, self.qmax)
        return self.unrows(q.to(torch.int32), x.shape)


def shrink_lp(x: Tensor, beta: float, p: float) -> Tensor:
    """Proximal operator of |x|^p / beta (generalized soft thresholding; p = 1: soft thresholding)."""
    if p == 1:
        return torch.sign(x) * torch.relu(x.abs() - 1.0 / beta)
    return torch.sign(x) * torch.relu(x.abs() - x.abs().pow(p - 1) / beta)


def lp_error(rows: Tensor, approx: Tensor, p: float) -> Tensor:
    """Per row, the mean |rows - approx|^p."""
    return (rows - approx).abs().pow(p).mean(dim=1, keepdim=True)


def fit_zero(rows: Tensor, scale: Tensor, zero: Tensor, q: IntQuantizer, sp: HQQSpecial) -> Tensor:
    """The half-quadratic zero-point iterations (float32 rows `[groups, group_size]`)."""
    beta, best_err, best = sp.beta, float("inf"), zero
    for step in range(sp.iters + 1):
        codes = torch.round(rows / scale + zero).clamp(q.qmin, q.qmax)
        approx = (codes - zero) * scale
        if sp.early_stop:
            err = (rows - approx).abs().mean().item()
            if err >= best_err:
                return best
            best_err, best = err, zero
        if step == sp.iters:
            break
        e = shrink_lp(rows - approx, beta, sp.lp_norm)
        zero = (codes - (rows - e) / scale).mean(dim=1, keepdim=True)
        beta *= sp.kappa
    return zero


def search_scale(rows: Tensor, scale: Tensor, zero: Tensor, q: HQQQuantizer, p: float) -> Tensor:
    """Per row, the scale of the grid `scale * (1 + f)`, |f| <= 5%, with the lowest lp error."""
    best_scale, best_err = scale, lp_error(rows, q._qdq_rows(rows, scale, zero), p)
    for f in torch.linspace(-SCALE_RANGE, SCALE_RANGE, SCALE_GRID).tolist():
        cand = representable_scale(scale * (1.0 + f), q.scale_dtype)
        err = lp_error(rows, q._qdq_rows(rows, cand, zero), p)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, cand, best_scale)
    return best_scale


@torch.no_grad()
def hqq_params(weight: Tensor, q: HQQQuantizer, sp: HQQSpecial) -> tuple[Tensor, Tensor]:
    """HQQ's scale and zero point (`[rows, 1]` float32, on the weight's device) for `weight`
    quantized by `q` (the layer's quantizer, scales representable in its dtype)."""
    rows = q.rows(weight.detach()).float()
    if q.calib_algo == "mse":
        start = scale, zero = q.calc_qparams(weight)
    else:
        xmin, xmax = observe_range(rows, q.calib_algo, q.percentile)
        start = scale, _ = q.params_from_range(xmin, xmax)
        zero = (-xmin.clamp(max=0) / scale).clamp(q.qmin, q.qmax)  # unrounded: a better start for a float zero
    float_q = dataclasses.replace(q, float_zero=True)
    if sp.optimize_scale:
        scale = search_scale(rows, scale, zero, float_q, sp.lp_norm)
    zero = fit_zero(rows, scale, zero, float_q, sp)
    if sp.round_zero:
        found = [(scale, zero.floor().clamp(q.qmin, q.qmax)), (scale, zero.ceil().clamp(q.qmin, q.qmax))]
    else:
        found = [(scale, zero)]
    return lowest_error(rows, q, sp.lp_norm, [*found, start])  # scored as the layer will quantize


def lowest_error(rows: Tensor, q: HQQQuantizer, p: float, pairs: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Per row, the (scale, zero) pair of `pairs` with the lowest lp error."""
    errs = torch.cat([lp_error(rows, q._qdq_rows(rows, s, z), p) for s, z in pairs], dim=1)
    pick = errs.argmin(dim=1, keepdim=True)
    scale = torch.cat([s for s, _ in pairs], dim=1).gather(1, pick)
    zero = torch.cat([z for _, z in pairs], dim=1).gather(1, pick)
    return scale, zero


@register_method
class HQQ(QuantMethod):
    name = "HQQ"
    quantizes_only = True
    Special = HQQSpecial
    needs_calibration = False
    data_parallel = True

    zero_points = frozenset({True, False})

    def __init__(self, quant: QuantSection, special: dict | None = None, final: bool = True) -> None:
        super().__init__(quant, special, final)
        w = quant.weight
        if w.symmetric:
            raise ConfigError("HQQ fits the zero point of an asymmetric grid; set quant.weight.symmetric: false")
        sp = self.special
        if w.round_zp is not None:  # llmc's key for the same choice
            if "round_zero" in (quant.special if special is None else special) and sp.round_zero != w.round_zp:
                raise ConfigError(f"quant.weight.round_zp: {str(w.round_zp).lower()} contradicts "
                                  f"quant.special.round_zero: {str(sp.round_zero).lower()}; keep one of them")
            sp = self.special = sp.model_copy(update={"round_zero": w.round_zp})
        self.hqq_quantizer = HQQQuantizer(
            **{f.name: getattr(self.weight_quantizer, f.name) for f in dataclasses.fields(IntQuantizer)},
            axis=sp.axis, float_zero=not sp.round_zero,
        )

    def export_refusal(self, save_flags: list[str]) -> str | None:
        sp = self.special
        for flag in save_flags:
            fmt = INTEGER_ZERO_FORMATS.get(flag)
            if fmt is None:
                continue
            if sp.axis == 0:
                return (f"HQQ with axis: 0 groups the output rows, which {fmt} ({flag}) cannot store; "
                        f"set quant.special axis: 1, or remove save.{flag}")
            if not sp.round_zero:
                return (f"HQQ's zero points are floats, which {fmt} ({flag}) stores as integers; set quant.special "
                        f"round_zero: true (integer zero points: about RTN's error, a little lower with "
                        f"optimize_scale), or remove save.{flag}")
        return None

    def _layer_quantizer(self) -> IntQuantizer:
        sp = self.special
        return self.weight_quantizer if sp.axis == 1 and sp.round_zero else self.hqq_quantizer

    def wrap_linear(self, ctx: BlockContext, name: str) -> FakeQuantLinear:
        return FakeQuantLinear.wrap(ctx.block, name, self._layer_quantizer(), self.act_quantizer,
                                    act_static=self.quant.act is not None and self.quant.act.static)

    def restore_linear(self, block: nn.Module, name: str, cls: type[FakeQuantLinear]) -> FakeQuantLinear:
        return cls.wrap(block, name, self._layer_quantizer(), self.act_quantizer,
                        act_static=self.quant.act is not None and self.quant.act.static)

    def process_block(self, ctx: BlockContext) -> None:
        sp = self.special
        start = end = 0.0
        for name in ctx.targets:
            linear = ctx.block.get_submodule(name)
            if is_pruned(linear) and not sp.round_zero:
                raise ConfigError(f"HQQ's float zero points would make the pruned weights of {name} nonzero; "
                                  f"set quant.special round_zero: true, or remove the sparse section")
            w = self.quant.weight
            if sp.axis == 0 and w.granularity == "per_group" and not w.partial_group \
                    and linear.out_features % w.group_size:
                raise ModelError(f"HQQ axis: 0 groups output rows, but group_size {w.group_size} does not divide "
                                 f"the {linear.out_features} outputs of {name}; use a divisor, or axis: 1")
            fq = self.wrap_linear(ctx, name)
            q = dataclasses.replace(self.hqq_quantizer, scale_dtype=fq.weight_quantizer.scale_dtype)
            rows = q.rows(fq.weight.detach()).float()
            start += lp_error(rows, q._qdq_rows(rows, fq.w_scale, fq.w_zero), sp.lp_norm).sum().item()
            fq.set_weight_qparams(*hqq_params(fq.weight, q, sp))
            end += lp_error(rows, fq.weight_quantizer._qdq_rows(rows, fq.w_scale, fq.w_zero), sp.lp_norm).sum().item()
        if ctx.targets:
            log.info("HQQ block %d: lp error %.4g -> %.4g (relative to min/max rounding: %.3f)",
                     ctx.index, start, end, end / start if start else 1.0)

    def extra_device_bytes(self, model: nn.Module, adapter: ModelAdapter, calib_tokens: int) -> int:
        """float32 working copies of the largest linear (rows, codes, error, shrunk error, temporaries)."""
        block = adapter.get_blocks(model)[0]
        largest = max((m.weight.numel() for m in block.modules() if isinstance(m, nn.Linear)), default=0)
        return 6 * 4 * largest
