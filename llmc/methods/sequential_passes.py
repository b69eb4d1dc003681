"""The true-sequential schedule of a Hessian-based method (GPTQ, SpQR) over one block: one forward
pass per group of linears sharing an input, in execution order, each measuring its group's Hessian
with the groups before it already quantized, then the group's solve.

Passes skip what they have computed before. A direct child of the block whose quantization targets
are all solved gives the same output in every later pass, so it is not run again:
  * when its last target is alone in its group (attention's o_proj, the MLP's down_proj), that linear's
    input of every batch is kept during the pass that measures its Hessian, and later passes run only
    the linear (`BlockContext.replay_through`, checked on batch 0 to reproduce the child exactly);
    a pass after attention's o_proj then skips the q/k/v projections, rotary embeddings and attention;
  * otherwise, and after that one pass, the child's outputs are recorded in the pass that runs it and
    replayed after.
With `keep_final`, what the passes kept is handed to the pipeline's forward of the processed block
(`BlockContext.frozen`), which then runs only the MLP's down_proj, not its gate/up projections.
Only with the calibration activations on the device: everything kept is one activation per token.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from llmc.methods.hessian import group_hessians
from llmc.pipeline.blockwise import BlockContext, timed
from llmc.pipeline.context import LinearReplay, routes_tokens

Group = list[tuple[str, nn.Module]]


def children_targets(ctx: BlockContext) -> dict[str, set[str]]:
    """The block's direct children that hold quantization targets, with the targets each holds."""
    return children_of(ctx.targets)


def children_of(targets: list[str]) -> dict[str, set[str]]:
    owned: dict[str, set[str]] = {}
    for name in targets:
        child = name.split(".", 1)[0]
        if child != name:
            owned.setdefault(child, set()).add(name)
    return owned


def closed_by(group: Group, owned: dict[str, set[str]], done: set[str], block: nn.Module) -> str | None:
    """The child whose targets this group, one linear, completes (its other targets are `done`); not one
    holding MoE experts (an expert's linear sees only its routed tokens)."""
    if len(group) != 1:
        return None
    name = group[0][0]
    child = next((c for c, names in owned.items() if name in names and names - {name} <= done), None)
    return child if child is not None and not routes_tokens(block.get_submodule(child)) else None


def kept_features(block: nn.Module, groups: list[list[str]], keep_final: bool) -> int:
    """Features per token of the linear inputs the passes keep at most at once (the linears that close
    a child, the last group's only with `keep_final`): the memory plan's count of what they hold."""
    owned, done, features = children_of([n for g in groups for n in g]), set(), 0
    for k, names in enumerate(groups):
        group = [(n, None) for n in names]
        if (keep_final or k < len(groups) - 1) and closed_by(group, owned, done, block) is not None:
            features += block.get_submodule(names[0]).in_features
        done.update(names)
    return features


def sequential_passes(
    ctx: BlockContext,
    groups: list[Group],
    solve: Callable[[Group, Tensor], list],
    seconds: dict[str, float],
    replay_children: bool = True,
    keep_final: bool = False,
) -> list:
    """Measure and `solve(group, hessian)` each group in order; returns the solves' results, concatenated.
    `seconds` gets the "hessian" (passes) and "solve" stage times."""
    frozen: dict[str, list] = {}
    done: set[str] = set()
    owned = children_targets(ctx) if replay_children and ctx.inputs_on_device() else {}
    results: list = []
    for k, group in enumerate(groups):
        last = k == len(groups) - 1
        closing = closed_by(group, owned, done, ctx.block) if (keep_final or not last) else None
        # a child replayed through its linear is recorded in the next pass (its outputs then replayed as
        # they are, its linear's inputs freed): not last, since that pass's recordings serve no later pass
        ready = [c for c, names in owned.items()
                 if (c not in frozen or isinstance(frozen[c], LinearReplay)) and names <= done] if not last else []
        kept: list[Tensor] | None = [] if closing is not None else None
        with timed(seconds, "hessian", ctx.device):
            (hessian,), recorded = group_hessians(ctx, [group], replay=frozen, record=ready, keep_input=kept)
        frozen.update(recorded)
        if last and not keep_final:
            frozen.clear()
        with timed(seconds, "solve", ctx.device):
            results += solve(group, hessian)
        del hessian
        done.update(name for name, _ in group)
        if closing is not None:
            with timed(seconds, "hessian", ctx.device):
                replayed = ctx.replay_through(closing, group[0][0], kept, frozen)
            if replayed is not None:
                frozen[closing] = replayed
    if keep_final:
        ctx.frozen = frozen
    return results
