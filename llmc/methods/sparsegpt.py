"""SparseGPT: one-shot pruning with optimal-brain-surgeon updates of the remaining weights.

Frantar & Alistarh, 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot", arXiv:2301.00774 (Algorithm 1). Columns are visited in order with the upper
Cholesky factor U of the damped inverse Hessian (the same H = 2/n X^T X and factor as GPTQ,
`llmc.methods.hessian`); in each block of columns the mask is chosen by w^2 / U_jj^2 (per
output row: the cumulative count of pruned weights is `int(sparsity * columns)` at every
block end, so each row ends with exactly that many zeros; N:M picks per M columns as it
reaches them), pruned weights are set to zero and their error is spread over the columns not
yet visited. All Hessians of a block come from one forward of the block (the paper's
procedure); linears sharing an input share one Hessian and are solved as one stacked weight.

Config keys: `sparse.weight.{sparsity, pattern, layer_sparsity, owl_lambda, owl_m}` and
`sparse.special`: percdamp (0.01), blocksize (128; a multiple of M for N:M).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from llmc.errors import ConfigError, NumericsError
from llmc.methods.hessian import group_hessians, inverse_hessian_cholesky
from llmc.methods.sparse_base import SparseMethod, prune_mask, register_sparse_method
from llmc.pipeline.blockwise import BlockContext


class SparseGptSpecial(BaseModel):
    model_config = ConfigDict(extra="forbid")

    percdamp: float = Field(0.01, gt=0, description="Damping of diag(H), as a fraction of its mean.")
    blocksize: int = Field(128, ge=1, description="Columns per mask selection and lazy batch update.")


@torch.no_grad()
def sparsegpt_prune(
    weight: Tensor, hessian: Tensor, sparsity: float, n_m: tuple[int, int] | None,
    blocksize: int = 128, percdamp: float = 0.01,
) -> Tensor:
    """The pruned and updated weight `[out, in]` (float32) given the input's Hessian `[in, in]`."""
    W = weight.detach().float().clone()
    H = hessian.detach().to(W.device, torch.float32).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    U = inverse_hessian_cholesky(H, percdamp)
    del H
    cols = W.shape[1]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        d = torch.diag(U1)
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        if n_m is None:
            k = int(sparsity * i2) - int(sparsity * i1)
            mask1 = prune_mask(W1.pow(2) / d.pow(2)[None, :], k / (i2 - i1) + 1e-9, None)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if n_m is not None and i % n_m[1] == 0:
                span = slice(i, i + n_m[1])
                mask1[:, span] = prune_mask(W1[:, span].pow(2) / d[span].pow(2)[None, :], 0.0, n_m)
            w = W1[:, i]
            q = w.masked_fill(mask1[:, i], 0)
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1)
    return W


@register_sparse_method
class SparseGPT(SparseMethod):
    name = "SparseGPT"
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
        hessians, _ = group_hessians(ctx, groups)
        sparsity, sp = self.block_sparsity(ctx.index), self.special
        for group, hessian in zip(groups, hessians):
            weight = torch.cat([m.weight for _, m in group])
            try:
                pruned = sparsegpt_prune(weight, hessian, sparsity, self.sparse.weight.n_m, sp.blocksize, sp.percdamp)
            except NumericsError as exc:
                raise NumericsError(f"SparseGPT on block {ctx.index} ({', '.join(n for n, _ in group)}): {exc}") from None
            start = 0
            for name, module in group:
                stop = start + module.weight.shape[0]
                module.weight.copy_(pruned[start:stop].to(module.weight.dtype))
                start = stop
                self.record(ctx, name, module)
