"""Model adapters: a model family described as data, never as code paths in algorithms.

An adapter says where the decoder blocks are, which modules run before the first block
(embeddings, rotary embedding) and after the last (final norm, head), and, per block,
the groups of linears that share one input: each with the op that produces that input
(a norm or a linear, where scales can be folded) and the module whose forward pass
observes them. This is llmc's `get_subsets_in_block` and GPTQModel's `module_tree`.

Names may hold `#`, expanded for each index of the module list at that place in each block
(`mlp.experts.#.gate_proj`): a group whose `prev_op` and `inspect` carry no `#` gathers
every index's linears (they share the input), one whose `inspect` carries `#` becomes one
group per index. A group absent from a block (a dense layer of an MoE model), or declared
for another layout of the same linears (`only_with` / `only_without`), is skipped there.
Named roles (`ModelRoles`, `BlockRoles`) let model-level methods (rotations, layer removal,
norm tweaking) reach the embedding, norms and projections without naming modules.
An optional `prepare` step rewrites what a declaration cannot say (Gemma's `1 + w` norms,
fused 3-D expert parameters) into plain modules, and `restore` writes the checkpoint's own
layout back before saving.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from llmc.errors import ModelError

INDEX = "#"


@dataclass(frozen=True)
class LinearGroup:
    """Linears of one block that read the same input tensor."""

    name: str
    linears: tuple[str, ...]
    prev_op: str | None
    inspect: str
    """Module (relative to the block) whose forward produces these linears' outputs; `""` is the
    block itself (parallel attention: one norm feeds both the attention and the MLP)."""
    also_reads: tuple[str, ...] = ()
    """Float modules reading the same input (MoE routers): a scale folded into `prev_op` is
    folded into their weight columns too; they are never quantized."""
    only_with: tuple[str, ...] = ()
    only_without: tuple[str, ...] = ()
    """Block modules that must be present (`only_with`) or absent (`only_without`) for the group
    to apply: they tell apart layouts with the same linears (Falcon's parallel or sequential
    attention, StableLM's parallel residual), each a group of its own."""
    when: Callable[[nn.Module], bool] | None = None
    """A condition on the block's state rather than its layout: the group applies only where
    `when(block)` holds (MoE: whether calibration runs every token through every expert, which
    decides which expert linears share one input; see llmc.models.moe)."""

    def is_indexed(self) -> bool:
        return any(INDEX in n for n in (*self.linears, self.inspect, self.prev_op or ""))

    def is_conditional(self) -> bool:
        return bool(self.only_with or self.only_without) or self.when is not None

    def fits(self, block: nn.Module) -> bool:
        """Whether `block` has the layout this group is declared for (see `only_with`)."""
        return all(get_submodule_or_none(block, n) is not None for n in self.only_with) and all(
            get_submodule_or_none(block, n) is None for n in self.only_without
        ) and (self.when is None or self.when(block))


@dataclass(frozen=True)
class BlockRoles:
    """What each part of a decoder block is, by name relative to the block (empty: absent)."""

    attn_norm: str | None = None
    """The norm in front of the attention (and of the MLP too, under parallel attention)."""
    attn_in: tuple[str, ...] = ()
    """Linears reading the attention norm's output: q, k, v (or a fused qkv)."""
    attn_v: str | None = None
    """The linear producing values (the fused qkv where there is one)."""
    attn_k: str | None = None
    """The linear producing keys alone (None where keys come from a fused qkv): KV-cache quantization."""
    attn_out: tuple[str, ...] = ()
    """The attention's output projection."""
    mlp_norm: str | None = None
    """The norm in front of the MLP (None under parallel attention, where attn_norm feeds both)."""
    mlp_in: tuple[str, ...] = ()
    mlp_out: tuple[str, ...] = ()
    router: tuple[str, ...] = ()
    """MoE routers (and shared-expert gates): linears left in float on purpose."""
    attn: str | None = None
    mlp: str | None = None
    post_norms: tuple[str, ...] = ()
    """Norms applied to a residual branch's output before it is added (Gemma 2/3's sandwich norms)."""


@dataclass(frozen=True)
class ModelRoles:
    """Model-level modules, by name relative to the model."""

    embedding: str
    final_norm: str | None
    lm_head: str
    stream_inputs: tuple[str, ...] = ()
    """Linears other than the embedding whose output enters the residual stream (LLaVA's projector)."""


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
    roles: ModelRoles | None = None
    block_roles: BlockRoles | None = None
    float_linears: tuple[str, ...] = ()
    """Linears of a block left in float on purpose (routers); never quantization targets."""
    block_returns_tuple: bool = False
    """Whether the model's decoder loop reads `outputs[0]` of each block (BLOOM, Falcon)."""
    logit_softcap: str | None = None
    """Config attribute holding a final-logit soft cap (`cap * tanh(logits / cap)`), if any."""
    lm_head_divisor: str | None = None
    """Config attribute the final hidden states are divided by before the LM head (the last head
    module), if any (MiniCPM's `logits_scaling`)."""
    auto_class: str = "AutoModelForCausalLM"
    """The transformers Auto class that loads the checkpoint (LLaVA: AutoModelForImageTextToText)."""
    prepare: Callable[[nn.Module], None] | None = None
    """Rewrites the loaded model into plain modules the declaration describes (e.g. fused
    experts into per-expert linears); run once after loading."""
    restore: Callable[[nn.Module, Callable[[nn.Module], Tensor]], Callable[[], None]] | None = None
    """`restore(model, weight_of)` undoes `prepare` so the model saves in the checkpoint's own
    layout, taking each prepared linear's weight from `weight_of(module)` (the fake-quantized
    one for save_fake); it returns the function that puts the prepared modules back."""

    # ---- names, expanded per block --------------------------------------------------------

    def linear_names(self) -> list[str]:
        """The declared linear names (with `#` unexpanded)."""
        return [name for group in self.groups for name in group.linears]

    def block_groups(self, block: nn.Module) -> list[LinearGroup]:
        """The groups of this block: `#` expanded, groups the block lacks left out."""
        out = []
        for group in self.groups:
            if not group.fits(block):
                continue
            for g in expand_group(group, block):
                if all(get_submodule_or_none(block, n) is not None for n in g.linears):
                    out.append(g)
        return out

    def block_linear_names(self, block: nn.Module) -> list[str]:
        return [name for group in self.block_groups(block) for name in group.linears]

    def block_float_linears(self, block: nn.Module) -> list[str]:
        names = [n for pattern in self.float_linears for n in expand_name(pattern, block)]
        return [n for n in names if get_submodule_or_none(block, n) is not None]

    @contextlib.contextmanager
    def checkpoint_layout(self, model: nn.Module, weight_of: Callable[[nn.Module], Tensor]) -> Iterator[None]:
        """The model in its checkpoint's own layout inside the context (see `restore`)."""
        undo = self.restore(model, weight_of) if self.restore is not None else None
        try:
            yield
        finally:
            if undo is not None:
                undo()

    # ---- modules --------------------------------------------------------------------------

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

    def role(self, model: nn.Module, name: str) -> nn.Module | None:
        """A model-level role's module (`embedding`, `final_norm`, `lm_head`), None where absent."""
        if self.roles is None:
            raise ModelError(f"adapter {self.name} declares no model roles; add roles= to its declaration")
        path = getattr(self.roles, name)
        return get_submodule_or_none(model, path) if path else None

    def apply_head(self, model: nn.Module, hidden: Tensor) -> Tensor:
        """Logits from the last block's output: the head modules in order, then any soft cap."""
        modules = self.head_modules(model)
        divisor = getattr(model.config, self.lm_head_divisor, None) if self.lm_head_divisor else None
        for index, module in enumerate(modules):
            if divisor and index == len(modules) - 1:
                hidden = hidden / divisor
            hidden = module(hidden)
        cap = getattr(model.config, self.logit_softcap, None) if self.logit_softcap else None
        if cap:
            hidden = torch.tanh(hidden / cap) * cap
        return hidden

    def block_head_dim(self, block: nn.Module) -> int:
        owner, _, attr = self.head_dim.rpartition(".")
        return int(getattr(block.get_submodule(owner) if owner else block, attr))

    def check(self, model: nn.Module) -> None:
        """Fail early, with the missing name, if the declaration does not match the model."""
        blocks = self.get_blocks(model)
        seen: set[str] = set()
        for index, block in enumerate(blocks):
            present = self.block_groups(block)
            if not present:
                raise ModelError(
                    f"adapter {self.name} finds none of its linears in block {index} of this model; "
                    f"set model.type to the adapter of this architecture"
                )
            for group in present:
                seen.add(group.name)
                for name in group.linears:
                    module = block.get_submodule(name)
                    if not isinstance(module, nn.Linear):
                        raise ModelError(
                            f"adapter {self.name} declares linear {name!r} in each block, but this model's block "
                            f"has {type(module).__name__}; set model.type to the adapter of this architecture"
                        )
        # a group of another layout (`only_with`/`only_without`) may be absent from every block
        missing = [g.name for g in self.groups
                   if not g.is_conditional() and _base_name(g.name) not in {_base_name(s) for s in seen}]
        if missing:
            first = missing[0]
            linear = next(g for g in self.groups if g.name == first).linears[0]
            raise ModelError(
                f"adapter {self.name} declares linear {linear!r}, which no block of this model has; "
                f"set model.type to the adapter of this architecture"
            )


def _base_name(group_name: str) -> str:
    return re.sub(r"\.\d+$", "", group_name)


def index_count(block: nn.Module, pattern: str) -> int:
    """How many entries the module list at the `#` of `pattern` has in `block` (0 if none)."""
    owner = pattern.split("." + INDEX)[0] if not pattern.startswith(INDEX) else ""
    holder = get_submodule_or_none(block, owner) if owner else block
    return len(holder) if isinstance(holder, (nn.ModuleList, nn.ModuleDict, nn.Sequential)) else 0


def expand_name(pattern: str, block: nn.Module) -> list[str]:
    if INDEX not in pattern:
        return [pattern]
    return [pattern.replace(INDEX, str(i)) for i in range(index_count(block, pattern))]


def expand_group(group: LinearGroup, block: nn.Module) -> list[LinearGroup]:
    if not group.is_indexed():
        return [group]
    if INDEX in group.inspect:
        count = index_count(block, group.inspect)
        return [
            dataclasses.replace(
                group,
                name=f"{group.name}.{i}",
                linears=tuple(n.replace(INDEX, str(i)) for n in group.linears),
                prev_op=group.prev_op.replace(INDEX, str(i)) if group.prev_op else None,
                inspect=group.inspect.replace(INDEX, str(i)),
            )
            for i in range(count)
        ]
    linears = tuple(n for pattern in group.linears for n in expand_name(pattern, block))
    return [dataclasses.replace(group, linears=linears)] if linears else []


def get_submodule_or_none(root: nn.Module, name: str) -> nn.Module | None:
    try:
        return root.get_submodule(name)
    except AttributeError:
        return None
