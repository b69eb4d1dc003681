"""The lifecycle every compression method (quantization and sparsification alike) follows.

The pipeline owns the schedule and calls, in order:

1. `prepare_model(mctx)`: once, before block inputs are captured (untie the head, rotate the
   embedding...);
2. when a method asks for it (`wants_statistics_pass`), `collect_block(ctx)` for every block in
   a read-only pass over the model (model-wide statistics, e.g. OWL's outlier ratios);
3. per block: `observe(ctx)` (asked of the first method: a context the pipeline's float
   forward runs in), `prepare_block(ctx)` (every method, before any method changes the
   block: e.g. record the float block's outputs as a training target), `process_block(ctx)` (transform, prune, quantize the block),
   `after_block(ctx, outputs)` (the outputs that feed the next block, e.g. ShortGPT's block
   influence);
4. `finish_model(mctx)`: once, after the last block (drop blocks, re-tie).

No method loops over blocks itself.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from llmc.models.adapter import ModelAdapter
from llmc.pipeline.blockwise import BlockContext
from llmc.pipeline.checkpoint import decode_state, encode_state


@dataclass
class ModelContext:
    """What a method may use at the model-level steps."""

    model: nn.Module
    adapter: ModelAdapter
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """The compute device of the run (a model-level step may move one block at a time there)."""
    seed: int = 42
    """The run's seed (base.seed), for model-level random choices (random rotations)."""
    results: dict[str, Any] = field(default_factory=dict)
    """Entries a method adds to results.json (under its name)."""


class CompressionMethod:
    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    needs_calibration: ClassVar[bool] = True
    resumable: ClassVar[bool] = True
    """Whether a run with this method can resume from per-block checkpoints (else it runs without them)."""
    data_parallel: ClassVar[bool] = False
    """Whether the method calibrates correctly with batches split across processes (`torchrun`,
    `llmc.pipeline.distributed`): it is data-free or reads the calibration data only through statistics
    reduced over ranks (the Hessian of `llmc.methods.hessian`)."""
    state_attrs: ClassVar[tuple[str, ...]] = ("stage_seconds",)
    """Attributes (JSON-able: numbers, strings, lists, dicts) that carry the method's state from one
    block to the next; a resumed run gets them back from the checkpoint (`llmc.pipeline.checkpoint`)."""

    def checkpoint_state(self) -> dict[str, Any]:
        return {a: encode_state(getattr(self, a)) for a in self.state_attrs if hasattr(self, a)}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        for attr, value in state.items():
            if attr in self.state_attrs:
                setattr(self, attr, decode_state(value))

    @property
    def wants_statistics_pass(self) -> bool:
        """Whether `collect_block` must see every block before any block is processed."""
        return False

    @property
    def uses_calibration(self) -> bool:
        return self.needs_calibration

    def check_adapter(self, adapter: ModelAdapter) -> None:
        """Refuse, with one line, a model whose adapter lacks what the method needs (after loading, before
        any evaluation or calibration)."""

    def prepare_model(self, mctx: ModelContext) -> None:
        """Model-level step before the block inputs are captured."""

    def collect_block(self, ctx: BlockContext) -> None:
        """Read-only look at one block in the statistics pass (only if `wants_statistics_pass`)."""

    def observe(self, ctx: BlockContext) -> contextlib.AbstractContextManager:
        """A context the pipeline runs its calibration forward of the still-unchanged block in
        (before `process_block`, when the next block is fed from unchanged outputs; asked of the
        first method only), so a method can observe that forward instead of running its own."""
        return contextlib.nullcontext()

    def prepare_block(self, ctx: BlockContext) -> None:
        """Sees the block before any method of the run changes it (after `observe`)."""

    def process_block(self, ctx: BlockContext) -> None:
        raise NotImplementedError

    def after_block(self, ctx: BlockContext, outputs: list[Tensor] | None) -> None:
        """Sees the block's outputs (what the next block receives), after `process_block`."""

    def finish_model(self, mctx: ModelContext) -> None:
        """Model-level step after the last block."""

    def extra_device_bytes(self, model: nn.Module, adapter: ModelAdapter, calib_tokens: int) -> int:
        """Device memory this method keeps beyond the block and its activations (for the planner)."""
        return 0

    def replay_device_bytes(self, model: nn.Module, adapter: ModelAdapter, calib_tokens: int) -> int:
        """Device memory beyond `extra_device_bytes` taken only with the activation cache on the device
        (what the method then keeps to skip recomputing, e.g. GPTQ's replayed children)."""
        return 0
