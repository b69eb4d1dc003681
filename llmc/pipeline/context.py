"""What a method sees of one block (`BlockContext`): the block, its calibration inputs and the
forwards a method may run over them (to the end, until a submodule, replaying recorded outputs,
with hooks on inputs or calls), as scheduled by `llmc.pipeline.blockwise`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from llmc.models.adapter import LinearGroup, ModelAdapter
from llmc.models.moe import RoutedExperts
from llmc.pipeline.capture import BlockInputs
from llmc.quant.fake_linear import fake_weights_reused


class _StopBlock(Exception):
    pass


@dataclass
class ModuleCall:
    """One recorded call of a submodule: its arguments and its (first) output."""

    args: tuple
    kwargs: dict
    output: Tensor

    def rerun(self, module: nn.Module) -> Tensor:
        out = module(*self.args, **self.kwargs)
        return out[0] if isinstance(out, tuple) else out


class LinearReplay:
    """A finished child's output of every batch, recomputed from the recorded input of its last linear:
    `child(...) == linear(inputs[b])` (as a 1-tuple plus `tail` when the child returns a tuple). The
    linear is looked up by name at each call, so a wrapped (fake-quant) linear is the one that runs.
    Holding the linear's input instead of the child's output skips everything before the linear in
    the child (for attention: the q/k/v projections, rotary embeddings and attention itself)."""

    def __init__(self, block: nn.Module, linear: str, inputs: list[Tensor], tail: tuple | None) -> None:
        self.block, self.linear, self.inputs, self.tail = block, linear, inputs, tail

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, batch: int):
        out = self.block.get_submodule(self.linear)(self.inputs[batch])
        return out if self.tail is None else (out, *self.tail)


@dataclass
class BlockContext:
    """What a method may use to process one block."""

    index: int
    block: nn.Module
    adapter: ModelAdapter
    inputs: BlockInputs | None
    device: torch.device
    targets: list[str]
    """Names (relative to the block) of the linears to quantize; ignored layers removed."""
    batch: int = 0
    """Index of the calibration batch being run (set by `forward` / `forward_until`)."""
    frozen: dict[str, list] = field(default_factory=dict)
    """Outputs of submodules of every batch that the last method recorded after their last change;
    the pipeline's forward of the processed block replays them instead of computing them again (the
    schedule clears this before each method)."""

    def token_mask(self, batch: int) -> Tensor | None:
        """`[b, seq]` bool of the real tokens of calibration batch `batch` (None: all are real)."""
        masks = self.inputs.token_masks if self.inputs is not None else []
        return masks[batch] if batch < len(masks) else None

    def groups(self) -> list[tuple[LinearGroup, dict[str, nn.Module]]]:
        """The adapter's linear groups with their modules, limited to quantization targets."""
        out = []
        for group in self.adapter.block_groups(self.block):
            mods = {n: self.block.get_submodule(n) for n in group.linears if n in self.targets}
            if mods:
                out.append((group, mods))
        return out

    def readers(self, group: LinearGroup) -> list[nn.Module]:
        """The float modules (routers) reading the group's input: a folded scale reaches them too."""
        return [self.block.get_submodule(n) for n in group.also_reads]

    @torch.no_grad()
    def forward(self) -> list[Tensor]:
        """Run the block over all calibration batches; returns the output hidden states."""
        if self.inputs is None:
            raise RuntimeError("this block has no calibration inputs (no method asked for calibration)")
        # a child holding MoE experts runs anyway: this forward counts their routing
        replay = {c: outs for c, outs in self.frozen.items() if not routes_tokens(self.block.get_submodule(c))}
        with fake_weights_reused(self.block), self._replaying(replay):
            return run_block(self.block, self.inputs, self.device, self._set_batch)

    def _set_batch(self, index: int) -> None:
        self.batch = index

    def inputs_on_device(self) -> bool:
        """Whether the calibration activations are cached on the compute device (not in host memory or on disk)."""
        return (self.inputs is not None and len(self.inputs) > 0 and not self.inputs.on_disk
                and self.inputs.hidden[0].device.type == self.device.type)

    @torch.no_grad()
    def forward_until(
        self,
        name: str | None,
        *,
        inclusive: bool = True,
        batches: int | None = None,
        replay: dict[str, list] | None = None,
        record: Sequence[str] = (),
    ) -> dict[str, list]:
        """Run each calibration batch only until submodule `name` has run (`inclusive`: its forward
        hooks fire) or is about to run (its forward pre-hooks fire), skipping the rest of the block:
        enough to observe the inputs of the linears up to there. `name=None` runs the whole block.

        `batches` limits the run to the leading batches. `replay` maps submodules to their
        recorded output of every batch: they return it instead of computing (a method passes
        only modules that have not changed since). `record` names submodules whose output of
        every batch is returned, for those that ran to completion in every batch.
        """
        if self.inputs is None:
            raise RuntimeError("this block has no calibration inputs (no method asked for calibration)")

        def stop(*_: object) -> None:
            raise _StopBlock

        recorded: dict[str, list] = {n: [] for n in record}
        handles = [
            self.block.get_submodule(n).register_forward_hook(lambda _m, _a, out, n=n: recorded[n].append(out))
            for n in record
        ]
        if name is not None:
            target = self.block.get_submodule(name)
            handles.append(target.register_forward_hook(stop) if inclusive else target.register_forward_pre_hook(stop))
        count = len(self.inputs) if batches is None else min(batches, len(self.inputs))
        try:
            with self._replaying(replay or {}):
                for i in range(count):
                    self.batch = i
                    hidden, args, kwargs = self.inputs.batch(i, self.device)
                    try:
                        self.block(hidden, *args, **kwargs)
                    except _StopBlock:
                        pass
        finally:
            for h in handles:
                h.remove()
        return {n: outs for n, outs in recorded.items() if len(outs) == count}

    @torch.no_grad()
    def replay_through(self, child: str, linear: str, inputs: list[Tensor], replay: dict[str, list]
                       ) -> LinearReplay | None:
        """`child`'s outputs as `LinearReplay` of `linear` (its last linear, whose input of every batch
        is `inputs`), when that reproduces the child exactly on batch 0 (run with `replay`); else None:
        something runs after the linear in the child, or the child returns more than the linear's output
        (or the linear did not run once per batch: MoE experts see only their routed tokens)."""
        if len(inputs) != len(self.inputs) or routes_tokens(self.block.get_submodule(child)):
            return None
        real = self.forward_until(child, batches=1, replay=replay, record=[child]).get(child, [None])[0]
        candidate = self.block.get_submodule(linear)(inputs[0])
        if isinstance(real, Tensor):
            return LinearReplay(self.block, linear, inputs, None) if torch.equal(real, candidate) else None
        if (isinstance(real, tuple) and real and isinstance(real[0], Tensor) and torch.equal(real[0], candidate)
                and all(x is None for x in real[1:])):
            return LinearReplay(self.block, linear, inputs, real[1:])
        return None

    @contextlib.contextmanager
    def _replaying(self, replay: dict[str, list]) -> Iterator[None]:
        """The named submodules return their recorded output of the batch being run instead of computing."""
        replaced = [self.block.get_submodule(n) for n in replay]
        # An instance-level forward (e.g. an accelerate hook's wrapper) is put back afterwards.
        own_forwards = [vars(module).get("forward") for module in replaced]
        for module, outs in zip(replaced, replay.values()):
            module.forward = lambda *_a, _outs=outs, **_k: _outs[self.batch]
        try:
            yield
        finally:
            for module, own in zip(replaced, own_forwards):
                if own is None:
                    del module.forward
                else:
                    module.forward = own

    @torch.no_grad()
    def capture_calls(self, name: str) -> list[ModuleCall]:
        """Run the block up to submodule `name` and record each of its calls (arguments and output),
        so a method can re-run just that module, e.g. attention with its mask and rotary embeddings."""
        with self.recording_calls([name]) as calls:
            self.forward_until(name)
        return calls[name]

    @contextlib.contextmanager
    def recording_calls(
        self, names: Sequence[str], batches: int | None = None
    ) -> Iterator[dict[str, list[ModuleCall]]]:
        """Record each call (arguments and output) of the named submodules during forwards in this
        context, in the leading `batches` calibration batches only when given."""
        calls: dict[str, list[ModuleCall]] = {n: [] for n in names}

        def hook(name: str, args: tuple, kwargs: dict, output: object) -> None:
            if batches is None or self.batch < batches:
                calls[name].append(ModuleCall(args, kwargs, output[0] if isinstance(output, tuple) else output))

        handles = [
            self.block.get_submodule(n).register_forward_hook(
                lambda _m, args, kwargs, out, n=n: hook(n, args, kwargs, out), with_kwargs=True
            )
            for n in dict.fromkeys(names)
        ]
        try:
            yield calls
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def hook_inputs(
        self, names: Sequence[str], fn: Callable[[str, Tensor], None], only_real_tokens: bool = False
    ) -> Iterator[None]:
        """Call `fn(name, input)` for each named submodule's input during forwards in this context.

        With `only_real_tokens`, `fn` gets the input as `[tokens, features]` rows of the real
        (non-padding) tokens of the batch being run. A linear with an online input transform (an
        `input_transform`, e.g. a Hadamard) gives its input after the transform: what its weight sees.
        """

        def hook(module: nn.Module, name: str, x: Tensor) -> None:
            transform = getattr(module, "input_transform", None)
            if transform is not None:
                x = transform(x)
            fn(name, real_tokens(x, self.token_mask(self.batch)) if only_real_tokens else x)

        handles = [
            self.block.get_submodule(n).register_forward_pre_hook(lambda m, args, n=n: hook(m, n, args[0]))
            for n in names
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def run_block(
    block: nn.Module, inputs: BlockInputs, device: torch.device, on_batch: Callable[[int], None] | None = None
) -> list[Tensor]:
    outs = inputs.new_hidden()
    finite = []
    for index in range(len(inputs)):
        if on_batch is not None:
            on_batch(index)
        hidden, args, kwargs = inputs.batch(index, device)
        out = block(hidden, *args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        if not inputs.on_disk:  # checked where computed: a host-memory cache is not scanned again
            finite.append(torch.isfinite(out).all())
        outs.append(inputs.store(index, out))
    if finite:
        outs = CheckedHidden(outs)
        outs.finite = bool(torch.stack(finite).all())
    return outs


class CheckedHidden(list):
    """A block's output hidden states with `finite`: whether all were finite (see `check_finite`)."""

    finite: bool | None = None


def routes_tokens(module: nn.Module) -> bool:
    """Whether `module` holds MoE experts, whose routing counts the block's forward updates."""
    return any(isinstance(m, RoutedExperts) for m in module.modules())


def real_tokens(t: Tensor, mask: Tensor | None) -> Tensor:
    """Rows `[tokens, features]` of `t` (`[batch, seq, features]`) for the real (non-padding) tokens."""
    if mask is not None and t.dim() == 3 and t.shape[:2] == mask.shape:
        return t[mask.to(t.device)]
    return t.reshape(-1, t.shape[-1])
