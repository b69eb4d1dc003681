"""Model adapters: a model family described as data, never as code paths in algorithms.

An adapter says where the decoder blocks are, which modules run before the first block
(embeddings, rotary embedding) and after the last (final norm, head), and, per block,
the groups of linears that share one input: each with the op that produces that input
(a norm or a linear, where scales can be folded) and the module whose forward pass
observes them. This is llmc's `get_subsets_in_block` and GPTQModel's `module_tree`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from llmc.errors import ModelError


@dataclass(frozen=True)
class LinearGroup:
    """Linears of one block that read the same input tensor."""

    name: str
    linears: tuple[str, ...]
    prev_op: str | None
    inspect: str
    """Module (relative to the block) whose forward produces these linears' outputs."""


@dataclass(frozen=True)
class ModelAdapter:
    name: str
    model_types: tuple[str, ...]
    """Values of `config.model_type` this adapter serves (used for auto-detection)."""
    blocks: str
    pre_block: tuple[str, ...]
    """Modules run before the first block; moved to the device while block inputs are captured."""
    head: tuple[str, ...]
    """Modules applied in order to the last block's output to get logits (missing ones are skipped)."""
    groups: tuple[LinearGroup, ...]
    aliases: tuple[str, ...] = field(default=())
    head_dim: str = "self_attn.head_dim"
    """Attribute path (relative to a block) of the attention head size; folding a scale from
    v_proj into o_proj under grouped-query attention needs it."""

    def linear_names(self) -> list[str]:
        return [name for group in self.groups for name in group.linears]

    def get_blocks(self, model: nn.Module) -> nn.ModuleList:
        blocks = get_submodule_or_none(model, self.blocks)
        if not isinstance(blocks, nn.ModuleList):
            raise ModelError(
                f"adapter {self.name} expects decoder blocks at {self.blocks!r}, which this model lacks; "
                f"set model.type to the adapter of this architecture"
            )
        return blocks

    def head_modules(self, model: nn.Module) -> list[nn.Module]:
        return [m for name in self.head if (m := get_submodule_or_none(model, name)) is not None]

    def pre_block_modules(self, model: nn.Module) -> list[nn.Module]:
        return [m for name in self.pre_block if (m := get_submodule_or_none(model, name)) is not None]

    def block_head_dim(self, block: nn.Module) -> int:
        owner, _, attr = self.head_dim.rpartition(".")
        return int(getattr(block.get_submodule(owner) if owner else block, attr))

    def check(self, model: nn.Module) -> None:
        """Fail early, with the missing name, if the declaration does not match the model."""
        blocks = self.get_blocks(model)
        for name in self.linear_names():
            module = get_submodule_or_none(blocks[0], name)
            if not isinstance(module, nn.Linear):
                raise ModelError(
                    f"adapter {self.name} declares linear {name!r} in each block, but this model's block has "
                    f"{type(module).__name__ if module is not None else 'no such module'}; "
                    f"set model.type to the adapter of this architecture"
                )


def get_submodule_or_none(root: nn.Module, name: str) -> nn.Module | None:
    try:
        return root.get_submodule(name)
    except AttributeError:
        return None
