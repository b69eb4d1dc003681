"""The block-wise schedule: one decoder block on the compute device at a time.

Per block: move it to the device, let each method observe and transform it, calibrate
static activation ranges, run it to produce the next block's inputs (from the float
block, or from the quantized one when `quant_out`), move it back. Methods only see a
`BlockContext`; the schedule is owned here.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from llmc.errors import NumericsError
from llmc.models.adapter import LinearGroup, ModelAdapter
from llmc.pipeline.capture import BlockInputs
from llmc.pipeline.distributed import broadcast_block, reduce_ranges
from llmc.pipeline.offload import BlockTrips, ModuleHome
from llmc.pipeline.planner import MemoryPlan
from llmc.pipeline.records import first_batch_output, relative_error
from llmc.pipeline.streaming import block_store
from llmc.quant.fake_linear import FakeQuantLinear, fake_weights_reused


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
        with fake_weights_reused(self.block), self._replaying(self.frozen):
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


def add_elapsed(seconds: dict[str, float], stage: str, since: float, device: torch.device) -> float:
    """Add the time since `since` (after the device's queued work) to `seconds[stage]`; returns now."""
    if device.type == "cuda":  # this stream only: blocks moving on side streams (BlockTrips) keep moving
        torch.cuda.current_stream(device).synchronize()
    now = time.perf_counter()
    seconds[stage] = seconds.get(stage, 0.0) + now - since
    return now


@contextlib.contextmanager
def timed(seconds: dict[str, float], stage: str, device: torch.device) -> Iterator[None]:
    """Add the wall time of the body to `seconds[stage]`."""
    start = time.perf_counter()
    yield
    add_elapsed(seconds, stage, start, device)


def real_tokens(t: Tensor, mask: Tensor | None) -> Tensor:
    """Rows `[tokens, features]` of `t` (`[batch, seq, features]`) for the real (non-padding) tokens."""
    if mask is not None and t.dim() == 3 and t.shape[:2] == mask.shape:
        return t[mask.to(t.device)]
    return t.reshape(-1, t.shape[-1])


def check_finite(tensors: list[Tensor], where: str) -> None:
    finite = getattr(tensors, "finite", None)  # a disk cache's generation checked its tensors as written
    if finite is None:
        finite = all(bool(torch.isfinite(t).all()) for t in tensors)
    if not finite:
        raise NumericsError(
            f"NaN/Inf in the activations {where}; the model overflows in this dtype or the data is bad: "
            f"use model.torch_dtype: bfloat16 or float32, and check the model weights and calibration data"
        )


class BlockwisePipeline:
    def __init__(
        self,
        model: nn.Module,
        adapter: ModelAdapter,
        device: torch.device,
        quant_out: bool = False,
        progress: bool = True,
        desc: str = "blocks",
        record_blocks: bool = False,
    ) -> None:
        self.model = model
        self.adapter = adapter
        self.device = device
        self.quant_out = quant_out
        self.progress = progress
        self.desc = desc
        self.block_seconds: list[float] = []
        self.stage_seconds: dict[str, float] = {}
        """Wall time per stage summed over blocks (to_device, forward, process, offload)."""
        self.plan: MemoryPlan | None = None
        """The memory plan the run was checked against (llmc.pipeline.planner.MemoryPlan)."""
        self.results: dict = {}
        """What methods report at the model-level steps, for results.json (set by llmc.schedule)."""
        self.overlap_transfers = False
        """Prefetch the next block and send the last one home during a block's work (CUDA; see
        llmc.pipeline.offload.BlockTrips); the memory plan decides (`MemoryPlan.overlap`)."""
        self.record_blocks = record_blocks
        self.block_records: list[dict] = []
        """With `record_blocks`, per processed block (results.json `blocks`, plotted by `llmc report`):
        index, wall seconds, the relative output error of the processed block against the float one on
        calibration batch 0 (one extra forward of that batch), and the device's peak memory so far (GiB,
        CUDA only: cumulative, since resetting the peak per block would hide a run's overall peak)."""

    def _lap(self, stage: str, since: float) -> float:
        return add_elapsed(self.stage_seconds, stage, since, self.device)

    def run(
        self,
        inputs: BlockInputs | None,
        process: Callable[[BlockContext], None] | None = None,
        targets: Callable[[int], list[str]] | None = None,
        observe: Callable[[BlockContext], contextlib.AbstractContextManager] | None = None,
        after: Callable[[BlockContext, list[Tensor] | None], None] | None = None,
        first: int = 0,
        consume: bool = False,
    ) -> BlockInputs | None:
        """Process every block in order; returns the last block's outputs (None without inputs).

        `first`: the blocks before it are already processed (a resumed run) and `inputs` hold
        block `first`'s hidden states.

        `observe(ctx)` is a context the forward of the float block runs in, when there is one
        (without `quant_out`): a method may record what it needs there instead of running its own.
        `after(ctx, outputs)` sees the outputs that feed the next block. With `consume` (the caller
        does not read `inputs` again) each block's inputs kept on disk are deleted once it is done.
        """
        blocks = self.adapter.get_blocks(self.model)
        if inputs is not None:
            check_finite(inputs.hidden, f"entering block {first}")
        # a disk-streamed model reads each block itself (llmc.pipeline.streaming)
        trips = BlockTrips(blocks, self.device, self.overlap_transfers, store=block_store(self.model))
        try:
            return self._run(blocks, trips, inputs, process, targets, observe, after, first, consume)
        finally:
            trips.close()

    def _run(self, blocks, trips: BlockTrips, inputs, process, targets, observe, after, first: int, consume: bool
             ) -> BlockInputs | None:
        bar = tqdm(range(first, len(blocks)), desc=self.desc, unit="block", disable=not self.progress,
                   initial=first, total=len(blocks))
        for index in bar:
            start = time.perf_counter()
            block = blocks[index]
            if inputs is not None:
                inputs = inputs.for_block(index)
            trip = trips.arrive(index)
            ctx = BlockContext(
                index=index,
                block=block,
                adapter=self.adapter,
                inputs=inputs,
                device=self.device,
                targets=targets(index) if targets else [],
            )
            lap = self._lap("to_device", start)
            outs = None
            if inputs is not None and not self.quant_out:
                with observe(ctx) if observe is not None else contextlib.nullcontext():
                    outs = ctx.forward()
            lap = self._lap("forward", lap)
            measure = self.record_blocks and process is not None and inputs is not None and len(inputs) > 0
            reference = None
            if measure:
                reference = outs[0] if outs is not None else first_batch_output(ctx)
                lap = self._lap("block_error", lap)
            if process is not None:
                process(ctx)
                if inputs is not None:
                    calibrate_static_activations(ctx)
                broadcast_block(block)  # data-parallel runs: every rank continues from rank 0's block
            lap = self._lap("process", lap)
            if inputs is not None:
                if outs is None:
                    outs = ctx.forward()
                check_finite(outs, f"leaving block {index}")
            if after is not None:
                after(ctx, outs)
            if inputs is not None:
                inputs = inputs.with_hidden(outs)
            lap = self._lap("forward", lap)
            error = None
            if measure:
                processed = outs[0] if self.quant_out else first_batch_output(ctx)
                error = relative_error(processed, reference, ctx.token_mask(0))
                lap = self._lap("block_error", lap)
            trips.depart(trip)
            if consume and ctx.inputs is not None:
                ctx.inputs.release()  # block i's inputs go now (files on disk, tensors in memory)
            self._lap("offload", lap)
            self.block_seconds.append(time.perf_counter() - start)
            if self.record_blocks:
                peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
                self.block_records.append({"block": index, "seconds": self.block_seconds[-1],
                                           "output_rel_error": error, "peak_gib": peak})
        bar.close()
        return inputs


    def replay(self, inputs: BlockInputs | None, finished: int, restore: Callable[[int], None]) -> BlockInputs | None:
        """A resumed run: put blocks 0..`finished` back (`restore(index)`) and return the inputs of block
        `finished + 1`, computed as the original run did: the outputs of the processed block (with
        `quant_out`) or of the block as loaded, before it is restored."""
        blocks = self.adapter.get_blocks(self.model)
        bar = tqdm(range(finished + 1), desc="resume", unit="block", disable=not self.progress)
        for index in bar:
            if inputs is None:
                restore(index)
                continue
            inputs = inputs.for_block(index)
            trip = ModuleHome(blocks[index], self.device)
            trip.leave()
            ctx = BlockContext(index=index, block=blocks[index], adapter=self.adapter, inputs=inputs,
                               device=self.device, targets=[])
            if self.quant_out:
                restore(index)
            outs = ctx.forward()
            restore(index)  # (again with quant_out) buffers a forward updates, e.g. MoE routing counts
            inputs = inputs.with_hidden(outs)
            trip.come_back()
        bar.close()
        return inputs


def calibrate_static_activations(ctx: BlockContext) -> None:
    """Observe input ranges of static-activation linears over the calibration set, then freeze them."""
    static = [m for m in ctx.block.modules() if isinstance(m, FakeQuantLinear) and m.act_static and m.enabled]
    if not static:
        return
    for m in static:
        m.observing = True
    ctx.forward()
    lows, highs = reduce_ranges([m._a_min for m in static], [m._a_max for m in static])  # over data-parallel ranks
    for m, lo, hi in zip(static, lows, highs):
        m._a_min, m._a_max = lo, hi
        m.finish_observing()
