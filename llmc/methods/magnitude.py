"""Magnitude pruning: zero the weights of smallest |W| in each output row (or N of every M inputs).

Han et al., 2015, "Learning both Weights and Connections for Efficient Neural Networks",
arXiv:1506.02626; the data-free baseline of Wanda and SparseGPT. Needs no calibration data.

Config keys: `sparse.weight.{sparsity, pattern, layer_sparsity}` (see `sparse_base`); no
`sparse.special` keys.
"""

from __future__ import annotations

from torch import Tensor

from llmc.methods.sparse_base import SparseMethod, register_sparse_method
from llmc.pipeline.blockwise import BlockContext


@register_sparse_method
class Magnitude(SparseMethod):
    name = "Magnitude"
    needs_calibration = False
    data_parallel = True

    @property
    def uses_calibration(self) -> bool:
        return self.wants_statistics_pass  # OWL's outlier ratios need activations

    def scores(self, ctx: BlockContext, names: list[str]) -> dict[str, Tensor]:
        return {n: ctx.block.get_submodule(n).weight.detach().float().abs() for n in names}
