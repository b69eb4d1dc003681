"""SpQR: GPTQ with small groups whose statistics are quantized too, and sparse float outliers.

Dettmers, Svirschevski, Egiazarian, Kuznedelev, Frantar, Ashkboos, Borzunov, Hoefler and Alistarh, 2023,
"SpQR: A Sparse-Quantized Representation for Near-Lossless LLM Weight Compression", arXiv:2306.03078
(Algorithm 1). GPTQ's column sweep (`llmc.methods.hessian.obs_sweep`, Cholesky factor U of H^-1) with:
  * small groups (`quant.weight.group_size`, 16 in the paper) of consecutive columns (of the act-order
    permutation with `actorder`), each row's scale and zero point fit by min-max when the sweep reaches
    the group, from the weights updated by every earlier column; the zero point is a float (SpQR's
    `round_zero: false`): w_hat = s * (clamp(round(w / s + z), 0, 2^bit - 1) - z);
  * bilevel statistics: a group's per-row scales, and its zero points, are themselves quantized (the
    `scale` and `zero` sub-sections: 3 bits, min-max over groups of 16 consecutive output rows), and
    the weights are rounded to the grid of these quantized statistics;
  * unstructured outliers: a weight whose GPTQ error (w - q(w))^2 / U_ii^2 (= the OBS sensitivity)
    exceeds tau = relative_threshold * mean_j(Var_rows(W[:, j]) / U_jj^2) keeps its float value, and
    its (zero) error is not spread to later columns. Before a group's statistics are fit, the weights
    whose leave-one-out gain (how much the row's Hessian-weighted group error falls when that weight is
    left out of the range) exceeds tau are replaced by the mean of the row's other weights, so likely
    outliers do not widen the range (`simplified_outliers: true` skips this).
The result, `SpqrLinear`, holds the swept weight (outliers at their float values), the quantized
statistics and the outlier mask; its fake weight is the quantized weight with the outliers put back,
exactly. The weight of every linear is solved on its own (the threshold and the statistics groups are
per linear, as in the reference code), in GPTQ's schedule (`true_sequential`, replayed children).
No serving format stores SpQR's sparse outliers and quantized statistics: the real-quantized exports
are refused before calibration; save_trans and save_fake (the dense fake weight) work; a pruned model
(`sparse:`) is refused, as the float zero points would move its zeros. results.json
(`methods.SpQR`) records the outlier fraction and the storage cost in bits per weight (`storage_bits`,
the paper's accounting: W3 g16 with 3-bit statistics per 16 rows costs 3.625 + 32 x outlier fraction).

Config keys (ModelTC/llmc's `SpQR`): `quant.weight.{bit, symmetric, group_size}` with
`granularity: per_group` and `calib_algo: minmax` (llmc's `round_zp: false` is SpQR's only mode here),
`quant.act.*` optional, and `quant.special`:
  relative_threshold (0.2, > 0, or inf): tau as a multiple of the mean sensitivity scale; inf: no outliers;
  simplified_outliers (false): fit the statistics without the leave-one-out outlier pre-pass;
  scale, zero: each {bit (3), symmetric (false), granularity (per_group | per_tensor), group_size (16:
    consecutive output rows), round_zp (false)}, or null to keep that statistic in float; the zero
    points of a symmetric weight grid are constant and never quantized;
  percdamp (1.0, SpQR's and llmc's config value), blocksize (128; rounded down to a multiple of
    group_size), actorder (false), true_sequential (true): GPTQ's keys.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor

from llmc.config.schema import QuantSection
from llmc.errors import ConfigError, NumericsError
from llmc.methods.base import QuantMethod, register_method
from llmc.methods.gptq import GPTQ, GptqResult
from llmc.methods.hessian import inverse_hessian_cholesky, obs_problem, obs_sweep
from llmc.methods.sparse_base import is_pruned
from llmc.pipeline.blockwise import BlockContext
from llmc.quant.fake_linear import FakeQuantLinear
from llmc.quant.outliers import REAL_FORMATS
from llmc.quant.quantizer import representable_scale

log = logging.getLogger("llmc")
TINY = torch.finfo(torch.float32).tiny * 1e3


class StatQuant(BaseModel):
    """`quant.special.scale` / `zero`: how one statistic of a column group (one value per row) is quantized."""

    model_config = ConfigDict(extra="forbid")

    bit: int = Field(3, ge=2, le=8, description="Bits per quantized statistic.")
    symmetric: bool = Field(False, description="Symmetric grid for the statistic.")
    granularity: Literal["per_group", "per_tensor"] = Field(
        "per_group", description="per_group: groups of group_size consecutive output rows; per_tensor: all rows.")
    group_size: int = Field(16, ge=1, description="Output rows per group of statistics.")
    round_zp: bool = Field(False, description="Round the statistic quantizer's own zero point.")


class SpqrSpecial(BaseModel):
    model_config = ConfigDict(extra="forbid")

    relative_threshold: float = Field(0.2, gt=0, description="Outlier threshold over the mean sensitivity (inf: none).")
    simplified_outliers: bool = Field(False, description="Skip the leave-one-out outlier pre-pass of the statistics.")
    scale: StatQuant | None = Field(default_factory=StatQuant, description="Quantization of the group scales.")
    zero: StatQuant | None = Field(default_factory=StatQuant, description="Quantization of the group zero points.")
    percdamp: float = Field(1.0, gt=0, description="Damping of diag(H), as a fraction of its mean.")
    blocksize: int = Field(128, ge=1, description="Columns per lazy batch update.")
    actorder: bool = Field(False, description="Quantize columns in order of decreasing diag(H).")
    true_sequential: bool = Field(True, description="Hessian of each group after quantizing earlier groups.")

    @field_validator("relative_threshold", mode="before")
    @classmethod
    def _inf(cls, v):
        if isinstance(v, str) and v.strip().lower().lstrip(".") in ("inf", "infinity"):
            return math.inf
        return v


def minmax_params(x: Tensor, maxq: int, symmetric: bool = False, round_zero: bool = False) -> tuple[Tensor, Tensor]:
    """SpQR's grid for each row of `x` `[rows, k]`: min to max (zero need not be inside), float zero point
    (rounded with `round_zero`); symmetric: +-absmax with zero (maxq + 1) / 2 (GPTQ's). `[rows, 1]` each."""
    lo, hi = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
    if symmetric:
        hi = torch.maximum(hi, -lo)
        lo = -hi
    # A constant row gets the range from zero to its value, so the value itself is on the grid.
    flat = hi <= lo
    lo, hi = torch.where(flat, lo.clamp(max=0), lo), torch.where(flat, hi.clamp(min=0), hi)
    scale = ((hi - lo) / maxq).clamp(min=TINY)
    if symmetric:
        return scale, torch.full_like(scale, (maxq + 1) / 2)
    zero = -lo / scale
    return scale, zero.round() if round_zero else zero


def spqr_qdq(x: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """Quantize-dequantize with a float zero point (broadcast params)."""
    return (torch.clamp(torch.round(x / scale + zero), 0, maxq) - zero) * scale


def quantize_stat(v: Tensor, q: StatQuant | None) -> Tensor:
    """The statistic `v` `[rows]` on its own grid (groups of consecutive rows), dequantized."""
    if q is None:
        return v
    n = v.numel()
    size = q.group_size if q.granularity == "per_group" else n
    pad = -n % size  # a partial last group: repeating its last value keeps its range
    rows = torch.cat([v, v[-1:].expand(pad)]).view(-1, size)
    maxq = 2**q.bit - 1
    return spqr_qdq(rows, *minmax_params(rows, maxq, q.symmetric, q.round_zp), maxq).flatten()[:n]


def loo_gain(G: Tensor, d: Tensor, maxq: int, symmetric: bool) -> Tensor:
    """For each weight of the group `G` `[rows, k]`: how much its row's error sum((q(w) - w) / d)^2 falls
    when that weight is left out of the row's range (and not quantized); `d` `[k]` is diag(U)."""
    k = G.shape[1]
    idx = torch.arange(k, device=G.device)
    loo = idx[1:] - (idx[:, None] >= idx[1:]).long()  # row j: every column but j
    data = G[:, loo].flatten(0, 1)  # [rows * k, k - 1]
    rest = spqr_qdq(data, *minmax_params(data, maxq, symmetric), maxq) - data
    loo_err = (rest.view(G.shape[0], k, k - 1) / d[loo]).square().sum(-1)
    base = ((spqr_qdq(G, *minmax_params(G, maxq, symmetric), maxq) - G) / d).square().sum(1, keepdim=True)
    return base - loo_err


def storage_bits(rows: int, cols: int, bit: int, symmetric: bool, group_size: int, sp: SpqrSpecial,
                 outliers: int) -> int:
    """Bits to store one SpQR weight `[rows, cols]` (the paper's accounting): the weight codes; per statistic
    its codes plus a 16-bit scale and zero per statistics group (16 bits per value when kept in float);
    32 bits per outlier (16-bit value, 16-bit column index)."""
    groups = -(-cols // group_size)
    total = rows * cols * bit + 32 * outliers
    for q in [sp.scale] if symmetric else [sp.scale, sp.zero]:  # a symmetric grid's zero is a constant
        if q is None:
            total += 16 * rows * groups
        else:
            per_column_group = -(-rows // q.group_size) if q.granularity == "per_group" else 1
            total += rows * groups * q.bit + groups * per_column_group * 16 * (1 if q.symmetric else 2)
    return total


@dataclass
class SpqrResult(GptqResult):
    outliers: Tensor | None = None
    """`[out, in]` bool: the weights kept at their float value."""


@torch.no_grad()
def spqr_quantize(
    weight: Tensor, hessian: Tensor, bit: int, symmetric: bool, group_size: int, sp: SpqrSpecial,
    consume_hessian: bool = False,
) -> SpqrResult:
    """SpQR for one weight `[out, in]` given its input's Hessian `[in, in]` (float32 math). Returns the
    swept weight (quantized, outliers in float), the quantized statistics per (row, group) as
    `[out * n_groups, 1]` (row `o * n_groups + g`), each column's group and the outlier mask."""
    W, H = obs_problem(weight, hessian, consume_hessian)
    rows, cols = W.shape
    maxq = 2**bit - 1
    perm = torch.argsort(torch.diag(H), descending=True) if sp.actorder else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    U = inverse_hessian_cholesky(H, sp.percdamp)
    del H
    d = U.diagonal()
    rt = sp.relative_threshold
    threshold = math.inf if math.isinf(rt) else rt * (W.var(dim=0) / d.square()).mean().item()
    n_groups = -(-cols // group_size)
    scales, zeros = W.new_empty(rows, n_groups), W.new_empty(rows, n_groups)
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    # Blocks of whole groups, so a group's statistics see every update from the columns before it.
    blocksize = max(group_size, sp.blocksize // group_size * group_size)
    zero_q = None if symmetric else sp.zero

    def fit_group(G: Tensor, col: int) -> None:
        if not (sp.simplified_outliers or math.isinf(threshold) or G.shape[1] < 2):
            likely = loo_gain(G, d[col : col + G.shape[1]], maxq, symmetric) > threshold
            keep = (~likely).float()
            mean = (G * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp(min=1)
            G = torch.where(likely, mean, G)
        s, z = minmax_params(G, maxq, symmetric)
        s = representable_scale(quantize_stat(s.flatten(), sp.scale).clamp(min=TINY), weight.dtype)
        scales[:, col // group_size], zeros[:, col // group_size] = s, quantize_stat(z.flatten(), zero_q)

    def solve_block(i1: int, i2: int, W1: Tensor) -> tuple[Tensor, Tensor]:
        Q1, Err1 = torch.empty_like(W1), torch.empty_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:
                fit_group(W1[:, i : i + group_size], col)
            w = W1[:, i]
            q = spqr_qdq(w, scales[:, col // group_size], zeros[:, col // group_size], maxq)
            err = (w - q) / U[col, col]
            if not math.isinf(threshold):
                out = err.square() > threshold
                q, err = torch.where(out, w, q), err.masked_fill(out, 0)
                mask[:, col] = out
            Q1[:, i], Err1[:, i] = q, err
            W1[:, i:].addr_(err, U[col, col:i2], alpha=-1)
        return Q1, Err1

    Q = obs_sweep(W, U, blocksize, solve_block)
    g_idx = torch.arange(cols, device=W.device) // group_size
    if perm is not None:
        inv = torch.argsort(perm)
        Q, mask, g_idx = Q[:, inv], mask[:, inv], g_idx[inv]
    return SpqrResult(Q, scales.reshape(-1, 1), zeros.reshape(-1, 1), g_idx, mask)


class SpqrLinear(FakeQuantLinear):
    """A fake-quant linear holding SpQR's result: per (row, group) quantized statistics `w_scale`/`w_zero`
    (row `o * n_groups + g`), each column's group `g_idx`, and `outlier_mask`, the weights kept in float."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        device = self.weight.device
        self.register_buffer("g_idx", torch.empty(0, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("outlier_mask", torch.empty(0, dtype=torch.bool, device=device), persistent=False)

    def set_result(self, result: SpqrResult) -> None:
        self.set_weight_qparams(result.scale, result.zero)
        self.g_idx = result.g_idx.to(self.weight.device)
        self.outlier_mask = result.outliers.to(self.weight.device)

    def quantized_weight(self) -> Tensor:
        """The weight on the grid of the quantized statistics (float32), outliers included."""
        wq = self.weight_quantizer
        scale = self.w_scale.view(self.out_features, -1)[:, self.g_idx]
        zero = self.w_zero.view(self.out_features, -1)[:, self.g_idx]
        return spqr_qdq(self.weight.float(), scale, zero, wq.qmax - wq.qmin)

    def fake_weight(self) -> Tensor:
        if self.g_idx.numel() == 0:  # not solved yet
            return super().fake_weight()
        return torch.where(self.outlier_mask, self.weight, self.quantized_weight().to(self.weight.dtype))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", {int(self.outlier_mask.sum())} float outliers (SpQR)"


@register_method
class SpQR(QuantMethod):
    name = "SpQR"
    data_parallel = True  # GPTQ's schedule: the Hessian is its only statistic
    Special = SpqrSpecial
    prefers_quant_out = True
    quantizes_only = True
    replay_children = True
    replays_final = False  # its outliers change the wrapped linears after the passes
    state_attrs = ("stage_seconds", "totals")
    # GPTQ's schedule over the block's groups (true_sequential, replayed children) and its memory estimate;
    # it calls this class's quantize_group and wrap.
    process_block = GPTQ.process_block
    extra_device_bytes = GPTQ.extra_device_bytes
    replay_device_bytes = GPTQ.replay_device_bytes
    _device_plan = GPTQ._device_plan
    _replays_final = GPTQ._replays_final

    zero_points = frozenset({False})  # its float zero points are quantized by quant.special.zero

    def __init__(self, quant: QuantSection, special: dict | None = None, final: bool = True) -> None:
        super().__init__(quant, special, final)
        w = quant.weight
        if w.granularity != "per_group":
            raise ConfigError(f"SpQR quantizes small groups of columns, not {w.granularity}; set "
                              f"quant.weight.granularity: per_group with group_size: 16")
        if w.calib_algo != "minmax":
            raise ConfigError(f"SpQR fits min-max group ranges, not calib_algo {w.calib_algo}; remove "
                              f"quant.weight.calib_algo (or set minmax)")
        self.totals = {"weights": 0, "outliers": 0, "bits": 0}
        """Over the linears solved so far, for results.json."""

    def export_refusal(self, save_flags: list[str]) -> str | None:
        for flag in save_flags:
            if flag in REAL_FORMATS:
                return (f"SpQR keeps sparse float outliers and quantized group statistics, which "
                        f"{REAL_FORMATS[flag]} ({flag}) cannot store; remove save.{flag} (save_trans and "
                        f"save_fake work)")
        return None

    def quantize_group(self, ctx: BlockContext, group: list, hessian: Tensor) -> list[tuple[str, SpqrResult]]:
        """SpQR each linear of the group on its own and write the result into its float weight."""
        w, out = self.quant.weight, []
        for k, (name, module) in enumerate(group):
            if is_pruned(module):  # float zero points put a pruned weight's zero off the grid
                raise ConfigError(f"SpQR cannot keep the zeros of pruned {name} (block {ctx.index}); quantize a "
                                  f"pruned model with quant.method GPTQ, or remove the sparse section")
            try:
                res = spqr_quantize(module.weight, hessian, w.bit, w.symmetric, w.group_size, self.special,
                                    consume_hessian=k == len(group) - 1)
            except NumericsError as exc:
                raise NumericsError(f"SpQR on block {ctx.index} ({name}): {exc}") from None
            with torch.no_grad():
                module.weight.copy_(res.weight.to(module.weight.dtype))
            out.append((name, dataclasses.replace(res, weight=module.weight)))
            n, (rows, cols) = int(res.outliers.sum()), res.outliers.shape
            bits = storage_bits(rows, cols, w.bit, w.symmetric, w.group_size, self.special, n)
            log.debug("SpQR block %d %s: %d outliers (%.3f%%), %.3f bits per weight", ctx.index, name, n,
                      100 * n / (rows * cols), bits / (rows * cols))
            for key, value in (("weights", rows * cols), ("outliers", n), ("bits", bits)):
                self.totals[key] += value
        return out

    def finish_model(self, mctx) -> None:
        t = self.totals
        if t["weights"]:
            mctx.results[self.name] = {**t, "outlier_fraction": t["outliers"] / t["weights"],
                                       "bits_per_weight": t["bits"] / t["weights"]}
            log.info("SpQR: %.3f%% of the weights kept as float outliers, %.3f bits per weight",
                     100 * t["outliers"] / t["weights"], t["bits"] / t["weights"])

    def wrap(self, ctx: BlockContext, name: str, result: SpqrResult) -> None:
        fq = SpqrLinear.wrap(ctx.block, name, self.weight_quantizer, self.act_quantizer,
                             act_static=self.quant.act is not None and self.quant.act.static)
        fq.set_result(result)
