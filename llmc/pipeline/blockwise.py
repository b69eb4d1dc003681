"""The block-wise schedule: one decoder block on the compute device at a time.

Per block: move it to the device, let each method observe and transform it, calibrate
static activation ranges, run it to produce the next block's inputs (from the float
block, or from the quantized one when `quant_out`), move it back. Methods only see a
`BlockContext`; the schedule is owned here.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from llmc.errors import NumericsError
from llmc.models.adapter import ModelAdapter
from llmc.pipeline.capture import BlockInputs
from llmc.pipeline.context import BlockContext, CheckedHidden, ModuleCall, real_tokens, run_block  # noqa: F401
from llmc.pipeline.distributed import broadcast_block, reduce_ranges
from llmc.pipeline.offload import BlockTrips, ModuleHome
from llmc.pipeline.planner import MemoryPlan
from llmc.pipeline.records import first_batch_output, relative_error
from llmc.pipeline.streaming import block_store
from llmc.quant.fake_linear import FakeQuantLinear


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
    with torch.profiler.record_function(stage):  # a range in profiler traces
        yield
    add_elapsed(seconds, stage, start, device)


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
