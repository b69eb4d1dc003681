"""Wanda: prune by |W| times the L2 norm of the input channel, compared within each output row.

Sun et al., 2024, "A Simple and Effective Pruning Approach for Large Language Models"
(Pruning by Weights and activations), arXiv:2306.11695. The score of W[i, j] is
|W[i, j]| * ||X[:, j]||_2 over the real calibration tokens; every linear of a block is scored
from one forward of the unpruned block (the paper's procedure), observed during the pipeline's
own forward when there is one.

Config keys: `sparse.weight.{sparsity, pattern, layer_sparsity, owl_lambda, owl_m}`; no
`sparse.special` keys.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from llmc.methods.sparse_base import SparseMethod, input_sq_sums, register_sparse_method, sq_sum_adder
from llmc.pipeline.blockwise import BlockContext


def wanda_scores(weight: Tensor, sq_sum: Tensor) -> Tensor:
    return weight.detach().float().abs() * sq_sum.to(weight.device).sqrt()[None, :]


@register_sparse_method
class Wanda(SparseMethod):
    name = "Wanda"
    # SmolLM2-135M, WikiText-2: 50% 47.65 with, 48.01 without; 2:4 181.4 with, 182.6 without.
    prefers_sparsity_out = True
    _observed: tuple[int, dict[str, Tensor]] | None = None

    @contextlib.contextmanager
    def observe(self, ctx: BlockContext) -> Iterator[None]:
        sums: dict[str, Tensor] = {}
        with ctx.hook_inputs(ctx.targets, sq_sum_adder(sums, ctx.device), only_real_tokens=True):
            yield
        self._observed = (ctx.index, sums)

    @torch.no_grad()
    def scores(self, ctx: BlockContext, names: list[str]) -> dict[str, Tensor]:
        observed, self._observed = self._observed, None
        sums = observed[1] if observed is not None and observed[0] == ctx.index else input_sq_sums(ctx, names)
        # A linear no calibration token reached (an MoE expert its router never chose, with
        # calib.moe_all_experts off) has no input norm: rank its weights by magnitude alone.
        weights = {n: ctx.block.get_submodule(n).weight for n in names}
        return {n: wanda_scores(w, sums.get(n, torch.ones(w.shape[1], device=w.device))) for n, w in weights.items()}
