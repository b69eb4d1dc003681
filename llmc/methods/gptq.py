"""GPTQ: quantize weights column by column, spreading each column's rounding error over the
columns not yet quantized with the inverse Hessian of the layer's reconstruction loss.

Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", arXiv:2210.17323 (Algorithm 1: lazy batch updates over blocks of columns,
Cholesky form of the inverse Hessian; "act-order" and static groups from the reference code).

Per group of linears sharing an input, H = 2/n * sum X^T X over the n real (non-padding)
calibration tokens. With `true_sequential`, groups are quantized in execution order and each
Hessian is measured with the earlier groups already quantized. The linear's float weight
becomes the GPTQ result Q, and its fake-quant parameters are the ones GPTQ used, so
`fake_weight()` reproduces Q exactly (the "transformed" model is therefore Q too).

Config keys: `quant.weight.{bit, symmetric, granularity, group_size, calib_algo, partial_group}`,
`quant.weight.quant_type` (int-quant, or nvfp4 / mxfp4 / mxfp8: see below), `quant.act.*` (applied to
the linears' inputs as for RTN), and `quant.special`:
  percdamp (0.01): damping added to diag(H), as a fraction of its mean;
  blocksize (128): columns per lazy batch update;
  actorder (false): quantize columns in order of decreasing diag(H);
  static_groups (false): per_group params from the original weight up front, so groups stay
    contiguous under actorder;
  true_sequential (true): measure each group's Hessian after quantizing the groups before it.
Float formats (llm-compressor's GPTQ does NVFP4 and MXFP4 too): the sweep rounds each column to the
format's grid (E2M1 / E4M3 values times the group's scale); a group of 16 (NVFP4) or 32 (MX) columns
gets its scale when the sweep reaches it, from the columns as updated so far (up front from the original
weight with static_groups, as llm-compressor does), and NVFP4's per-tensor global scale is fixed before
the sweep from the original weights of the linears sharing the input (RTN's tied scale). actorder needs
static_groups: true with them, since these checkpoints carry no g_idx (compressed-tensors dropped
act-order "group"; llm-compressor's default actorder "static"/"weight" is this one, applied to MX groups
and to no NVFP4 weight). FP8 (float-quant, per_block included) is refused: the sweep has no FP8 rounding
and keeps scales per row, where FP8 blocks share one across 128 rows.
`quant.quant_out` defaults to true with GPTQ: each block's Hessians come from the quantized
earlier blocks' outputs, so GPTQ also corrects the error they pass on. With SparseGPT's
`sparse.special.joint_quant`, SparseGPT runs this quantization inside its pruning sweep
(`ColumnGrids`, `solve_group`, `wrap_result` are shared) and GPTQ only gets the linears left.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from llmc.errors import ConfigError, NumericsError
from llmc.methods.base import QuantMethod, register_method
from llmc.methods.gptq_block import ColumnQdq, quantize_block, quantize_group_fused, use_triton
from llmc.methods.hessian import BlockWriter, group_hessians, inverse_hessian_cholesky, obs_problem, obs_sweep
from llmc.methods.sequential_passes import kept_features, sequential_passes
from llmc.methods.sparse_base import is_pruned
from llmc.models.adapter import ModelAdapter
from llmc.pipeline.blockwise import BlockContext, timed
from llmc.pipeline.distributed import is_distributed
from llmc.quant.fake_linear import FakeQuantLinear
from llmc.quant.microscaling import fix_global_scale
from llmc.quant.quantizer import IntQuantizer

FORMATS = frozenset({"nvfp4", "mxfp4", "mxfp8"})
"""The float formats GPTQ quantizes to (per_group with a format-specific rounding per column)."""


class GptqSpecial(BaseModel):
    model_config = ConfigDict(extra="forbid")

    percdamp: float = Field(0.01, gt=0, description="Damping of diag(H), as a fraction of its mean.")
    blocksize: int = Field(128, ge=1, description="Columns per lazy batch update.")
    actorder: bool = Field(False, description="Quantize columns in order of decreasing diag(H).")
    static_groups: bool = Field(False, description="per_group params from the original weight, up front.")
    true_sequential: bool = Field(True, description="Hessian of each group after quantizing earlier groups.")


@dataclass
class GptqResult:
    weight: Tensor
    """Q, the dequantized GPTQ weight `[out, in]` (float32, original column order)."""
    scale: Tensor
    """`[rows, 1]` in the rows() layout of the quantizer; per_group: row `o * n_groups + g` for group g."""
    zero: Tensor
    g_idx: Tensor
    """`[in]` int64: the group of each input column (all 0 unless per_group)."""


def qdq_elementwise(w: Tensor, scale: Tensor, zero: Tensor, quantizer: IntQuantizer) -> Tensor:
    """Quantize-dequantize with broadcast params; the same arithmetic as `IntQuantizer.quant_dequant`."""
    q = torch.clamp(torch.round(w / scale) + zero, quantizer.qmin, quantizer.qmax)
    return (q - zero) * scale


def natural_g_idx(columns: int, quantizer: IntQuantizer, device: torch.device | None = None) -> Tensor:
    """The group of each column when groups are contiguous (what FakeQuantLinear assumes)."""
    idx = torch.arange(columns, device=device)
    return idx // quantizer.group_size if quantizer.granularity == "per_group" else torch.zeros_like(idx)


class ColumnGrids:
    """The scale and zero point of each group of columns during a sweep (GPTQ's, or SparseGPT's joint
    mode): fixed up front from the weight (per_tensor, per_channel, per_group with `static_groups`),
    or, for per_group otherwise, set by `start` when the sweep reaches the group's first column, from
    the weights updated by every column before it (GPTQ's reference code)."""

    def __init__(self, W: Tensor, quantizer: IntQuantizer, static_groups: bool = False) -> None:
        cols = W.shape[1]
        self.quantizer = quantizer
        self.grouped = quantizer.granularity == "per_group"
        self.group_size = quantizer.group_size if self.grouped else cols
        self.dynamic = self.grouped and not static_groups
        self.qdq: ColumnQdq | None = None
        """A float format's rounding of one column (None: the integer grid)."""
        if isinstance(quantizer, IntQuantizer):
            # Each group's params are per row over its columns: a per_channel quantizer on a column slice.
            self.slice_quantizer = dataclasses.replace(quantizer, granularity="per_channel", group_size=-1)
        else:  # NVFP4 / MX: a slice of one group's columns is one group per row already
            quantizer.rows(W[:1])  # a ModelError unless the groups divide the columns
            self.slice_quantizer, self.qdq = quantizer, quantizer.qdq_broadcast
        self.params: list[tuple[Tensor, Tensor] | None] = [None] * -(-cols // self.group_size)
        if not self.grouped:
            self.params[0] = self._flat(quantizer.calc_qparams(W))
        elif static_groups:
            for g in range(len(self.params)):
                self.start(g, W[:, g * self.group_size : (g + 1) * self.group_size])

    @staticmethod
    def _flat(params: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        return params[0].view(-1), params[1].view(-1)

    def start(self, group: int, columns: Tensor) -> tuple[Tensor, Tensor]:
        """Fix group `group`'s params from its current `columns`; returns them as `[rows, 1]`."""
        self.params[group] = self._flat(self.slice_quantizer.calc_qparams(columns))
        return self.of(group)

    def of(self, group: int) -> tuple[Tensor, Tensor]:
        """Scale and zero point of group `group`, `[rows, 1]` (`[1, 1]` per_tensor)."""
        scale, zero = self.params[group]
        return scale.view(-1, 1), zero.view(-1, 1)

    def stacked(self) -> tuple[Tensor, Tensor]:
        """All groups' scales and zero points, `[rows, n_groups]`."""
        return torch.stack([p[0] for p in self.params], dim=1), torch.stack([p[1] for p in self.params], dim=1)

    def fused_solver(self, W: Tensor, U: Tensor) -> BlockWriter | None:
        """Dynamic integer groups with minmax ranges, where the Triton kernel runs: `obs_sweep`'s solver
        for blocks of one group each (in order), one launch per group that also fixes its params
        (`quantize_group_fused`, the values `start` would give); None elsewhere."""
        if not (self.dynamic and self.qdq is None and self.quantizer.calib_algo == "minmax"
                and use_triton(W[:, : self.group_size])):
            return None
        scales = W.new_empty(len(self.params), W.shape[0])
        zeros = torch.empty_like(scales)
        err = W.new_empty(W.shape[0], self.group_size)  # reused by every group

        def write(i1: int, i2: int, W1: Tensor, Q1: Tensor) -> Tensor:
            g = i1 // self.group_size
            self.params[g] = scales[g], zeros[g]
            quantize_group_fused(W1, U[i1:i2, i1:i2], Q1, err[:, : i2 - i1], scales[g], zeros[g], self.slice_quantizer)
            return err[:, : i2 - i1]

        return write

    def result(self, Q: Tensor, g_idx: Tensor) -> GptqResult:
        scale, zero = self.stacked()
        return GptqResult(Q, scale.reshape(-1, 1), zero.reshape(-1, 1), g_idx.long())


@torch.no_grad()
def gptq_quantize(
    weight: Tensor,
    hessian: Tensor,
    quantizer: IntQuantizer,
    blocksize: int = 128,
    percdamp: float = 0.01,
    actorder: bool = False,
    static_groups: bool = False,
    consume_hessian: bool = False,
    keep_zeros: bool = False,
) -> GptqResult:
    """GPTQ for one weight `[out, in]` given the Hessian `[in, in]` of its input (math in float32).

    With `consume_hessian` the float32 Hessian is damped in place instead of copied (one
    `[in, in]` less at the peak: 3 GiB for a 70B down_proj); the caller must not reuse it.
    With `keep_zeros` (a pruned weight) every zero of `weight` stays zero in Q.
    """
    quantizer = fix_global_scale(quantizer, [weight])  # NVFP4: from the original weight, before obs_problem
    W, H = obs_problem(weight, hessian, consume_hessian)
    pruned = W == 0 if keep_zeros else None
    cols = W.shape[1]
    grids = ColumnGrids(W, quantizer, static_groups)

    perm = torch.argsort(torch.diag(H), descending=True) if actorder else torch.arange(cols, device=W.device)
    if actorder:
        W, H = W[:, perm], H[perm][:, perm]
        pruned = pruned[:, perm] if pruned is not None else None
    # Group of each column in processing order; only dynamic groups under actorder follow that order.
    if grids.dynamic:
        col_group = torch.arange(cols, device=W.device) // grids.group_size
        # One group per block: its params then come from weights updated by every earlier group.
        blocksize = grids.group_size
    else:
        col_group = natural_g_idx(cols, quantizer, W.device)[perm]
        all_scale, all_zero = grids.stacked()  # [rows, n_groups]
    groups_in_order = col_group.tolist()

    Hinv = inverse_hessian_cholesky(H, percdamp)
    del H

    def solve_block(i1: int, i2: int, W1: Tensor) -> tuple[Tensor, Tensor]:
        if grids.dynamic:
            S1, Z1 = grids.start(groups_in_order[i1], W1)
        elif grids.grouped and (actorder or groups_in_order[i1] != groups_in_order[i2 - 1]):
            block_groups = col_group[i1:i2]
            S1, Z1 = all_scale[:, block_groups], all_zero[:, block_groups]
        else:
            S1, Z1 = grids.of(groups_in_order[i1])
        prune1 = pruned[:, i1:i2] if pruned is not None else None
        return quantize_block(W1, Hinv[i1:i2, i1:i2], S1, Z1, quantizer.qmin, quantizer.qmax, prune1, grids.qdq)

    fused = grids.fused_solver(W, Hinv) if not actorder and pruned is None else None
    Q = obs_sweep(W, Hinv, blocksize, fused or solve_block, writes_q=fused is not None)
    if actorder:
        inv = torch.argsort(perm)
        Q, col_group = Q[:, inv], col_group[inv]
    return grids.result(Q, col_group)


GroupSolver = Callable[[Tensor, Tensor, IntQuantizer | None, bool, list[tuple[str, nn.Module]]], GptqResult]
"""`(weight, hessian, quantizer, consume_hessian, part)`: one stacked weight's solve (GPTQ, SparseGPT)."""


def solve_group(
    group: list[tuple[str, nn.Module]], hessian: Tensor, quantizer: IntQuantizer | None, solve: GroupSolver,
    where: str, consume_hessian: bool = True, quantizer_of: Callable[[str], IntQuantizer] | None = None,
) -> list[tuple[str, GptqResult]]:
    """Solve the linears of a group sharing `hessian` and write each result into its linear's float
    weight (which the results then hold). Rows are independent given H, so the linears run as one
    stacked weight, except per_tensor where each linear needs its own single range. `where` (e.g.
    "GPTQ on block 3") prefixes a numerical error; with `consume_hessian` the last solve may damp
    `hessian` in place. With `quantizer_of` (mixed precision) each linear has its own quantizer, and
    only linears with equal ones are stacked."""
    runs: list[tuple[IntQuantizer | None, list]] = []
    for item in group:
        q = quantizer_of(item[0]) if quantizer_of is not None else quantizer
        if runs and runs[-1][0] == q and (q is None or q.granularity != "per_tensor"):
            runs[-1][1].append(item)
        else:
            runs.append((q, [item]))
    out = []
    for k, (part_quantizer, part) in enumerate(runs):
        weight = torch.cat([m.weight for _, m in part])
        wq = part_quantizer.for_dtype(weight.dtype) if part_quantizer is not None else None
        try:
            res = solve(weight, hessian, wq, consume_hessian and k == len(runs) - 1, part)
        except NumericsError as exc:
            raise NumericsError(f"{where} ({', '.join(n for n, _ in part)}): {exc}") from None
        per_row = res.scale.shape[0] // weight.shape[0]
        start = 0
        for name, module in part:
            stop = start + module.weight.shape[0]
            with torch.no_grad():
                module.weight.copy_(res.weight[start:stop].to(module.weight.dtype))
            span = slice(start * per_row, stop * per_row)
            out.append((name, GptqResult(module.weight, res.scale[span], res.zero[span], res.g_idx)))
            start = stop
    return out


def wrap_result(method: QuantMethod, ctx: BlockContext, name: str, result: GptqResult) -> FakeQuantLinear:
    """Replace block linear `name` by a fake-quant linear of `method` holding `result`'s params and
    g_idx, so its `fake_weight()` is Q exactly (a `GroupIndexFakeQuantLinear` for act-order groups)."""
    wq, aq = method.quantizers_for(ctx, name)
    natural = natural_g_idx(result.weight.shape[1], wq, result.g_idx.device)
    cls = FakeQuantLinear if torch.equal(result.g_idx, natural) else GroupIndexFakeQuantLinear
    fq = cls.wrap(ctx.block, name, wq, aq, act_static=method.act_static(ctx.adapter, ctx.block, ctx.index, name))
    fq.set_weight_qparams(result.scale, result.zero)
    fq.register_buffer("g_idx", result.g_idx.to(fq.weight.device), persistent=False)
    return fq


class GroupIndexFakeQuantLinear(FakeQuantLinear):
    """A fake-quant linear whose per_group params belong to arbitrary column groups `g_idx`
    (GPTQ act-order with dynamic groups), instead of contiguous runs of `group_size` columns."""

    def fake_weight(self) -> Tensor:
        scale = self.w_scale.view(self.out_features, -1)[:, self.g_idx]
        zero = self.w_zero.view(self.out_features, -1)[:, self.g_idx]
        return qdq_elementwise(self.weight.float(), scale, zero, self.weight_quantizer).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", g_idx (act-order groups)"


@register_method
class GPTQ(QuantMethod):
    name = "GPTQ"
    data_parallel = True  # its only statistic is the Hessian, reduced over ranks
    Special = GptqSpecial
    float_formats = FORMATS
    float_refusal = "its column sweep has no FP8 rounding and keeps scales per row, FP8 blocks one per 128 rows"
    # Measured on SmolLM2-135M W4 per-channel: WikiText-2 PPL 30.08 with, 32.30 without.
    prefers_quant_out = True
    module_schemes = True
    replay_children = True
    """With true_sequential, replay finished children of the block instead of re-running them."""
    replays_final = True
    """...and hand them to the pipeline's forward of the quantized block (`BlockContext.frozen`) when
    that forward computes what the passes did: weight-only, the weights wrapped unchanged (Q)."""

    def __init__(self, quant, special: dict | None = None, final: bool = True) -> None:
        super().__init__(quant, special, final)
        types = [quant.weight.quant_type] + [o.weight.get("quant_type") for o in quant.overrides if o.weight]
        fmt = next((t for t in types if t in FORMATS), None)
        if fmt and self.special.actorder and not self.special.static_groups:
            raise ConfigError(f"GPTQ actorder with quant_type {fmt} needs quant.special.static_groups: true ({fmt} "
                              "checkpoints have no g_idx for act-order groups); set it, or actorder: false")

    @property
    def arbitrary_group_order(self) -> bool:
        sp = self.special
        grans = {self.weight_quantizer.granularity} | {o.weight.get("granularity") for o in self.quant.overrides if o.weight}
        return "per_group" in grans and sp.actorder and not sp.static_groups

    def extra_device_bytes(self, model: nn.Module, adapter: ModelAdapter, calib_tokens: int) -> int:
        held, work, _ = self._device_plan(model, adapter, calib_tokens)
        return held + work

    def replay_device_bytes(self, model: nn.Module, adapter: ModelAdapter, calib_tokens: int) -> int:
        _, work, replayed = self._device_plan(model, adapter, calib_tokens)
        # kept for the block's forward after the last solve, or freed before it
        return replayed if self._replays_final() else max(0, replayed - work)

    def _device_plan(self, model: nn.Module, adapter: ModelAdapter, calib_tokens: int) -> tuple[int, int, int]:
        """float32 Hessians held at once; GPTQ's working set for the largest group; and, with the activation
        cache on the device, what the true-sequential passes keep to replay finished children
        (`sequential_passes`: a hidden state, or the inputs of the linears that close a child, per token)."""
        held = work = kept = 0
        for block in adapter.get_blocks(model):
            groups = [g.linears for g in adapter.block_groups(block)]
            kept = max(kept, kept_features(block, groups, self._replays_final()))
            sizes = []
            for names in groups:
                linears = [block.get_submodule(n) for n in names]
                sizes.append((linears[0].in_features, sum(m.out_features for m in linears)))
            hessians = [4 * i * i for i, _ in sizes]
            held = max(held, max(hessians) if self.special.true_sequential else sum(hessians))
            # Beside the held H (damped in place): its Cholesky factor and the inverse, plus a copy of H
            # when it is permuted (actorder) or shared by separate solves (per_tensor); four [rows, in].
            copies = 3 if self.special.actorder or self.weight_quantizer.granularity == "per_tensor" else 2
            work = max(work, max(4 * (copies * i * i + 4 * i * r) for i, r in sizes))
        replayed = 0
        if self.special.true_sequential and self.replay_children:
            per_token = max(kept, model.get_input_embeddings().embedding_dim)
            replayed = calib_tokens * per_token * next(model.parameters()).element_size()
        return held, work, replayed

    def _replays_final(self) -> bool:
        q = self.quant
        weight_only = q.act is None and q.kvcache is None and not any(o.act for o in q.overrides)
        return (self.replays_final and self.final and weight_only and self.special.true_sequential
                and self.replay_children and not is_distributed())

    def process_block(self, ctx: BlockContext) -> None:
        groups = [list(mods.items()) for _, mods in ctx.groups()]
        if not groups:  # e.g. every linear already quantized by SparseGPT's joint mode
            return
        results: list[tuple[str, GptqResult]] = []
        if self.special.true_sequential:
            results = sequential_passes(ctx, groups, lambda group, hessian: self.quantize_group(ctx, group, hessian),
                                        self.stage_seconds, self.replay_children, self._replays_final())
        else:
            with timed(self.stage_seconds, "hessian", ctx.device):
                hessians, _ = group_hessians(ctx, groups)
            with timed(self.stage_seconds, "solve", ctx.device):
                for group, hessian in zip(groups, hessians):
                    results += self.quantize_group(ctx, group, hessian)
        # Wrapping only now keeps the Hessian forwards free of (not yet calibrated) static
        # activation quantization; later groups already saw Q, the weights were written in place.
        if self.final:
            for name, result in results:
                self.wrap(ctx, name, result)

    def quantize_group(
        self, ctx: BlockContext, group: list[tuple[str, nn.Module]], hessian: Tensor
    ) -> list[tuple[str, GptqResult]]:
        """GPTQ the group's linears and write Q into their float weights (which the results then hold)."""
        sp = self.special

        def solve(weight, hessian, quantizer, consume, part):
            return gptq_quantize(weight, hessian, quantizer, sp.blocksize, sp.percdamp, sp.actorder,
                                 sp.static_groups, consume_hessian=consume,
                                 keep_zeros=any(is_pruned(m) for _, m in part))

        return solve_group(group, hessian, self.weight_quantizer, solve, f"GPTQ on block {ctx.index}",
                           quantizer_of=(lambda n: self.quantizers_for(ctx, n)[0]) if self.per_module else None)

    def wrap(self, ctx: BlockContext, name: str, result: GptqResult) -> None:
        wrap_result(self, ctx, name, result)
