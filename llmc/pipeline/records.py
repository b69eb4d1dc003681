"""Per-block records of the block loop (`BlockwisePipeline(record_blocks=True)`): the processed block's
output error against the float block on calibration batch 0, for results.json and `llmc report`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from llmc.models.moe import RoutedExperts
from llmc.quant.fake_linear import fake_weights_reused

if TYPE_CHECKING:
    from llmc.pipeline.blockwise import BlockContext


@torch.no_grad()
def first_batch_output(ctx: BlockContext) -> Tensor:
    """The block's output on calibration batch 0, MoE routing left uncounted (it is not a calibration pass)."""
    ctx.batch = 0
    hidden, args, kwargs = ctx.inputs.batch(0, ctx.device)
    counting = [m for m in ctx.block.modules() if isinstance(m, RoutedExperts) and m.calibrating]
    for m in counting:
        m.calibrating = False
    try:
        with fake_weights_reused(ctx.block):
            out = ctx.block(hidden, *args, **kwargs)
    finally:
        for m in counting:
            m.calibrating = True
    return out[0] if isinstance(out, tuple) else out


def relative_error(out: Tensor, reference: Tensor, mask: Tensor | None) -> float:
    """||out - reference|| / ||reference|| over the real tokens, in float32."""
    from llmc.pipeline.blockwise import real_tokens  # (blockwise imports this module)

    ref = real_tokens(reference, mask).float()
    diff = real_tokens(out.to(reference.device), mask).float() - ref
    return float(diff.norm() / ref.norm().clamp_min(torch.finfo(torch.float32).tiny))
