"""ShortGPT: remove the decoder blocks that change their input the least.

Men et al., 2024, "ShortGPT: Layers in Large Language Models are More Redundant Than You
Expect", arXiv:2403.03853. Block Influence BI_i = 1 - E_t[cos(x_i,t, x_i+1,t)] over the real
calibration tokens, from each block's input and output; after the last block the
`n_prune_layers` blocks of lowest BI are removed and the model's config is updated
(`num_hidden_layers`, per-layer lists such as `layer_types`), so the saved model loads with
fewer layers.

Config keys: `sparse.weight.n_prune_layers` (required); no `sparse.special` keys.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from llmc.errors import ConfigError
from llmc.methods.lifecycle import ModelContext
from llmc.methods.sparse_base import SparseMethod, register_sparse_method
from llmc.pipeline.blockwise import BlockContext, real_tokens

log = logging.getLogger("llmc")
PER_LAYER_CONFIG_LISTS = ("layer_types", "no_rope_layers", "sliding_window_pattern_list")


@register_sparse_method
class ShortGPT(SparseMethod):
    name = "ShortGPT"
    prunes_weights = False
    state_attrs = (*SparseMethod.state_attrs, "influence")

    def __init__(self, sparse) -> None:
        super().__init__(sparse)
        if sparse.weight.n_prune_layers is None:
            raise ConfigError("ShortGPT needs sparse.weight.n_prune_layers (how many blocks to remove, e.g. 4)")
        self.influence: dict[int, float] = {}
        self.removed: list[int] = []

    def check_model(self, n_blocks: int, widths: list[int]) -> None:
        if self.sparse.weight.n_prune_layers >= n_blocks:
            raise ConfigError(
                f"sparse.weight.n_prune_layers {self.sparse.weight.n_prune_layers} would remove every one of the "
                f"model's {n_blocks} blocks; use at most {n_blocks - 1}"
            )

    def process_block(self, ctx: BlockContext) -> None:
        pass

    @torch.no_grad()
    def after_block(self, ctx: BlockContext, outputs: list[Tensor] | None) -> None:
        if ctx.inputs is None or outputs is None:
            raise RuntimeError("ShortGPT needs calibration inputs")
        total, count = 0.0, 0
        for i, out in enumerate(outputs):
            mask = ctx.token_mask(i)
            x = real_tokens(ctx.inputs.hidden[i], mask).float()
            y = real_tokens(out, mask).float().to(x.device)
            total += float(torch.nn.functional.cosine_similarity(x, y, dim=-1).sum())
            count += x.shape[0]
        self.influence[ctx.index] = 1.0 - total / max(count, 1)

    def finish_model(self, mctx: ModelContext) -> None:
        n = self.sparse.weight.n_prune_layers
        self.removed = sorted(sorted(self.influence, key=self.influence.get)[:n])
        remove_blocks(mctx.model, mctx.adapter.get_blocks(mctx.model), self.removed)
        log.info("ShortGPT removed blocks %s (block influence %s)", self.removed,
                 ", ".join(f"{self.influence[i]:.4f}" for i in self.removed))

    def summary(self) -> dict:
        return {"method": self.name, "removed_blocks": self.removed,
                "block_influence": [self.influence[i] for i in sorted(self.influence)]}


def remove_blocks(model: nn.Module, blocks: nn.ModuleList, removed: list[int]) -> None:
    """Drop blocks in place; renumber the kept ones' `layer_idx`; shorten the config's per-layer lists."""
    kept = [i for i in range(len(blocks)) if i not in set(removed)]
    survivors = [blocks[i] for i in kept]
    for _ in range(len(blocks)):
        del blocks[0]
    for new_index, block in enumerate(survivors):
        blocks.append(block)
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    config = model.config
    for cfg in {id(c): c for c in (config, getattr(config, "text_config", None)) if c is not None}.values():
        if getattr(cfg, "num_hidden_layers", None) == len(kept) + len(removed):
            cfg.num_hidden_layers = len(kept)
        for key in PER_LAYER_CONFIG_LISTS:
            values = getattr(cfg, key, None)
            if isinstance(values, list) and len(values) == len(kept) + len(removed):
                setattr(cfg, key, [values[i] for i in kept])
