"""SparseGPT: one-shot pruning with optimal-brain-surgeon updates of the remaining weights.

Frantar & Alistarh, 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot", arXiv:2301.00774 (Algorithm 1). Columns are visited in order with the upper
Cholesky factor U of the damped inverse Hessian (the same H = 2/n X^T X, factor and column
sweep as GPTQ, `llmc.methods.hessian`); in each block of columns the mask is chosen by
w^2 / U_jj^2 (per output row: the cumulative count of pruned weights is `int(sparsity * columns)`
at every block end, so each row ends with exactly that many zeros; N:M picks per M columns as it
reaches them), pruned weights are set to zero and their error is spread over the columns not
yet visited. All Hessians of a block come from one forward of the block (the paper's
procedure); linears sharing an input share one Hessian and are solved as one stacked weight.

Joint sparsification and quantization (the paper's section "Joint Sparsification &
Quantization"), `sparse.special.joint_quant: true` with `quant.method: GPTQ` or `RTN`: in the same
sweep every kept weight is rounded to the grid of `quant.weight` (GPTQ's column rounding,
`llmc.methods.gptq_block`; per_group params fixed from the updated weights when the sweep reaches
a group's first column, or up front with GPTQ's static_groups) and every pruned one zeroed; the
combined error goes to the columns not yet visited. The linears that are also quantization
targets come out as fake-quant linears with GPTQ's params and g_idx, and the quant method leaves
them alone (`llmc.schedule` drops them from its targets): one Hessian pass instead of two. GPTQ's
special keys percdamp, blocksize and true_sequential do not apply to those linears (the joint pass
uses sparse.special's and one forward); actorder is refused.

Config keys: `sparse.weight.{sparsity, pattern, layer_sparsity, owl_lambda, owl_m}` and
`sparse.special`: percdamp (0.01), blocksize (128; a multiple of M for N:M), joint_quant (false).
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from llmc.errors import ConfigError
from llmc.methods.base import QuantMethod
from llmc.methods.gptq import GPTQ, ColumnGrids, GptqResult, natural_g_idx, solve_group, wrap_result
from llmc.methods.gptq_block import quantize_block
from llmc.methods.hessian import group_hessians, inverse_hessian_cholesky, obs_problem, obs_sweep
from llmc.methods.lifecycle import CompressionMethod
from llmc.methods.rtn import RTN
from llmc.methods.sparse_base import SparseMethod, prune_mask, register_sparse_method
from llmc.pipeline.blockwise import BlockContext, timed
from llmc.quant.quantizer import IntQuantizer

JOINT_QUANTIZED = "llmc_joint_quantized"
"""Attribute set on a fake-quant linear that SparseGPT's joint mode pruned and quantized in one pass."""


def is_joint_quantized(module: nn.Module) -> bool:
    return bool(getattr(module, JOINT_QUANTIZED, False))


class SparseGptSpecial(BaseModel):
    model_config = ConfigDict(extra="forbid")

    percdamp: float = Field(0.01, gt=0, description="Damping of diag(H), as a fraction of its mean.")
    blocksize: int = Field(128, ge=1, description="Columns per mask selection and lazy batch update.")
    joint_quant: bool = Field(
        False, description="Quantize the kept weights in the same pass, with the grid of the quant section "
        "(quant.method GPTQ or RTN), instead of pruning first and quantizing after."
    )


@torch.no_grad()
def sparsegpt_solve(
    weight: Tensor, hessian: Tensor, sparsity: float, n_m: tuple[int, int] | None,
    blocksize: int = 128, percdamp: float = 0.01, quantizer: IntQuantizer | None = None,
    static_groups: bool = False, consume_hessian: bool = False,
) -> GptqResult:
    """SparseGPT for one weight `[out, in]` given the input's Hessian `[in, in]` (math in float32):
    the pruned and updated weight; with `quantizer` its kept weights also rounded in the same sweep,
    with GPTQ's params (scale, zero, g_idx). Without it scale and zero are empty."""
    W, H = obs_problem(weight, hessian, consume_hessian)
    cols = W.shape[1]
    U = inverse_hessian_cholesky(H, percdamp)
    del H
    grids = ColumnGrids(W, quantizer, static_groups) if quantizer is not None else None
    gs = grids.group_size if grids is not None and grids.grouped else None
    qmin, qmax = (quantizer.qmin, quantizer.qmax) if quantizer is not None else (0, 0)
    m = n_m[1] if n_m is not None else None

    def solve_block(i1: int, i2: int, W1: Tensor) -> tuple[Tensor, Tensor]:
        U1 = U[i1:i2, i1:i2]
        d2 = torch.diag(U1).pow(2)[None, :]
        if n_m is None:
            k = int(sparsity * i2) - int(sparsity * i1)
            mask1 = prune_mask(W1.pow(2) / d2, k / (i2 - i1) + 1e-9, None)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        Q1, Err1 = torch.empty_like(W1), torch.empty_like(W1)
        # Runs of columns that share a mask choice (N:M span) and a grid (group); each run's error
        # reaches the rest of the block at once.
        cuts = sorted({i1, i2, *(range(i1, i2, m) if m else ()), *(range(-(-i1 // gs) * gs, i2, gs) if gs else ())})
        for a, b in zip(cuts, cuts[1:]):
            la, lb = a - i1, b - i1
            if m is not None and la % m == 0:
                span = slice(la, la + m)
                mask1[:, span] = prune_mask(W1[:, span].pow(2) / d2[:, span], 0.0, n_m)
            S = Z = None
            if grids is not None:
                group = a // grids.group_size
                if grids.dynamic and a % gs == 0:  # fixed from the updated weights as the sweep reaches it
                    S, Z = grids.start(group, kept_columns(a, min(a + gs, cols), i1, i2, W1, Err1, mask1))
                else:
                    S, Z = grids.of(group)
            Q1[:, la:lb], Err1[:, la:lb] = quantize_block(
                W1[:, la:lb], U1[la:lb, la:lb], S, Z, qmin, qmax, mask1[:, la:lb])
            W1[:, lb:].addmm_(Err1[:, la:lb], U1[la:lb, lb:], alpha=-1)
        return Q1, Err1

    def kept_columns(a: int, e: int, i1: int, i2: int, W1: Tensor, Err1: Tensor, mask1: Tensor) -> Tensor:
        """Columns a:e (a in the block i1:i2) as the sweep has updated them so far, those it prunes
        (already chosen: unstructured, in this block) zeroed, as GPTQ sees a pruned weight."""
        inside = W1[:, a - i1 : min(e, i2) - i1]
        if n_m is None:
            inside = inside.masked_fill(mask1[:, a - i1 : min(e, i2) - i1], 0)
        if e <= i2:
            return inside
        # Past the block: the block's lazy update so far, applied to a copy.
        return torch.cat([inside, W[:, i2:e] - Err1[:, : a - i1] @ U[i1:a, i2:e]], dim=1)

    Q = obs_sweep(W, U, blocksize, solve_block)
    if grids is None:
        empty = Q.new_empty(0, 1)
        return GptqResult(Q, empty, empty, torch.zeros(cols, dtype=torch.long, device=Q.device))
    return grids.result(Q, natural_g_idx(cols, quantizer, Q.device))


def join_quant(methods: list[CompressionMethod], quant_targets: Callable[[BlockContext], Collection[str]]) -> None:
    """With `sparse.special.joint_quant`, give SparseGPT the quant method whose grid it rounds to and
    `quant_targets` (a block's quantization targets); a one-line ConfigError for combinations it cannot do."""
    sparse = next((m for m in methods if isinstance(m, SparseGPT)), None)
    if sparse is None or not sparse.special.joint_quant:
        return
    quant = [m for m in methods if isinstance(m, QuantMethod)]
    fix = "set quant.method: GPTQ (or RTN), or drop sparse.special.joint_quant"
    if len(quant) != 1 or not isinstance(quant[0], (GPTQ, RTN)):
        got = f"quant.method {[m.name for m in quant] if len(quant) > 1 else quant[0].name}" if quant else "no quant section"
        raise ConfigError(f"sparse.special.joint_quant needs quant.method GPTQ or RTN, not {got}; {fix}")
    final = quant[0]
    if final.quant.weight.quant_type != "int-quant":
        raise ConfigError(f"sparse.special.joint_quant rounds to an integer grid, not quant_type "
                          f"{final.quant.weight.quant_type}; use quant.weight.quant_type: int-quant, or drop joint_quant")
    if isinstance(final, GPTQ) and final.special.actorder:
        raise ConfigError("sparse.special.joint_quant visits the columns in order; set quant.special.actorder: false "
                          "(static_groups works)")
    sparse.joint, sparse.quant_targets = final, quant_targets


@register_sparse_method
class SparseGPT(SparseMethod):
    name = "SparseGPT"
    data_parallel = True  # the Hessian is its only statistic (OWL's statistics pass is refused)
    # SmolLM2-135M, WikiText-2: 50% 42.01 with, 43.75 without; 2:4 88.4 with, 104.8 without.
    prefers_sparsity_out = True
    Special = SparseGptSpecial

    def __init__(self, sparse) -> None:
        super().__init__(sparse)
        n_m = sparse.weight.n_m
        if n_m is not None and self.special.blocksize % n_m[1]:
            raise ConfigError(
                f"sparse.special.blocksize {self.special.blocksize} is not a multiple of M={n_m[1]} of "
                f"pattern {sparse.weight.pattern}; use a blocksize such as 128"
            )
        self.joint: QuantMethod | None = None
        """Joint mode: the quant method (GPTQ or RTN) whose grid the sweep rounds to (`join_quant`)."""
        self.quant_targets: Callable[[BlockContext], Collection[str]] | None = None

    def extra_device_bytes(self, model, adapter, calib_tokens: int) -> int:
        """Every group's float32 Hessian at once (one forward measures them all), plus the largest
        group's working set: a copy of H, its inverse factor and three float32 `[rows, in]`."""
        peak = 0
        for block in adapter.get_blocks(model):
            sizes = [(block.get_submodule(g.linears[0]).in_features,
                      sum(block.get_submodule(n).out_features for n in g.linears)) for g in adapter.block_groups(block)]
            held = sum(4 * i * i for i, _ in sizes)
            work = max((4 * (2 * i * i + 3 * i * r) for i, r in sizes), default=0)
            peak = max(peak, held + work)
        return peak

    @torch.no_grad()
    def process_block(self, ctx: BlockContext) -> None:
        groups = [list(mods.items()) for _, mods in ctx.groups()]
        if not groups:
            return
        with timed(self.stage_seconds, "hessian", ctx.device):
            hessians, _ = group_hessians(ctx, groups)
        sparsity, sp, n_m, joint = self.block_sparsity(ctx.index), self.special, self.sparse.weight.n_m, self.joint
        quantized = set(self.quant_targets(ctx)) if joint is not None else set()
        static_groups = isinstance(joint, GPTQ) and joint.special.static_groups

        def solve(weight: Tensor, hessian: Tensor, quantizer: IntQuantizer | None, consume: bool, part) -> GptqResult:
            return sparsegpt_solve(weight, hessian, sparsity, n_m, sp.blocksize, sp.percdamp, quantizer,
                                   static_groups, consume)

        with timed(self.stage_seconds, "solve", ctx.device):
            for group, hessian in zip(groups, hessians):
                # Linears that are not quantization targets too are only pruned.
                parts = [(part, quant) for part, quant in (
                    ([item for item in group if item[0] not in quantized], None),
                    ([item for item in group if item[0] in quantized], joint),
                ) if part]
                for k, (part, quant) in enumerate(parts):
                    results = solve_group(part, hessian, quant.weight_quantizer if quant else None, solve,
                                          f"SparseGPT on block {ctx.index}", consume_hessian=k == len(parts) - 1)
                    for name, result in results:
                        self.record(ctx, name, ctx.block.get_submodule(name))
                        if quant is not None:
                            setattr(wrap_result(quant, ctx, name, result), JOINT_QUANTIZED, True)
