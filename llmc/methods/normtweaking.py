"""NormTweaking: after a block is quantized, tune its norms so its outputs match the float block's.

Li, Li, Zhang and Chu, 2023, "Norm Tweaking: High-performance Low-bit Quantization of Large
Language Models" (AAAI 2024, arXiv:2309.02784); ModelTC/llmc's `NormTweaking`. Quantization
shifts each output channel's distribution; the block's normalization weights (few parameters,
which saves like any norm) are trained to put it back. Per block (paper, Algorithm 1):

1. `prepare_block`: the float block's outputs on the calibration inputs are recorded as the
   target (before any method of the run changes the block). The target is this block's float
   output for the inputs it receives, so with `quant_out` the block is tuned for the quantized
   earlier blocks' outputs (llmc instead keeps a second, all-float chain of targets).
2. The block is quantized by the method before this one (`method: [GPTQ, NormTweaking]`) or,
   when NormTweaking is alone, by wrapping its targets with the configured quantizers (RTN).
3. Only the norm weights (and biases) of the `attn_norm` and `mlp_norm` roles are trained, with
   Adam, `epochs` passes over the calibration batches, at the paper's per-block learning rate
   `ntweak_lr * (1 + gamma * index / blocks)`, to minimize the channel-wise distribution loss
   (paper, Eq. 4): over the C output channels, with mean mu_c and variance var_c of each channel
   over the batch's real tokens,  L_dist = 1/C sum_c |mu_f,c - mu_q,c| + |var_f,c - var_q,c|
   (`loss: mse`: the mean squared error llmc uses instead). With a list `ntweak_lr` (the paper's
   grid search, here per block) each rate is trained from the same start. The trained norms are
   kept only if they lower the loss over the calibration set (so also the best of the grid);
   otherwise the block keeps its norms.

Training runs on a float32 copy of the block (norms are updated in float32, then cast back to
their dtype), with bfloat16 autocast on CUDA unless `deactive_amp`; on CPU in float32. Static
activation ranges are calibrated before training and again by the pipeline after it.

Config keys: `quant.weight.*`, `quant.act.*` (used when NormTweaking quantizes), and under
`quant.special` (llmc's names): ntweak_lr (float or list of floats, default 1e-6), epochs (50),
gamma (0.001), deactive_amp (false); and loss (dist, the paper's; or mse, llmc's).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from llmc.errors import ModelError
from llmc.methods.base import QuantMethod, register_method
from llmc.methods.lifecycle import ModelContext
from llmc.models.adapter import ModelAdapter
from llmc.pipeline.blockwise import BlockContext, calibrate_static_activations, real_tokens, timed
from llmc.quant.fake_linear import fake_weights_reused

log = logging.getLogger("llmc")


class NormTweakingSpecial(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ntweak_lr: float | list[float] = Field(1e-6, description="Adam learning rate, or a grid of them tried per block.")
    epochs: int = Field(50, ge=0, description="Passes over the calibration batches per block.")
    gamma: float = Field(0.001, ge=0, description="Learning-rate growth with depth: lr * (1 + gamma * index / blocks).")
    deactive_amp: bool = Field(False, description="Train in float32 on CUDA too (no bfloat16 autocast).")
    loss: Literal["dist", "mse"] = Field("dist", description="dist: the paper's channel distribution loss; mse.")

    @field_validator("ntweak_lr")
    @classmethod
    def _positive(cls, value: float | list[float]) -> float | list[float]:
        rates = value if isinstance(value, list) else [value]
        if not rates or any(not (r > 0 and math.isfinite(r)) for r in rates):
            raise ValueError("must be a positive learning rate or a non-empty list of them")
        return value

    def rates(self) -> list[float]:
        return self.ntweak_lr if isinstance(self.ntweak_lr, list) else [self.ntweak_lr]


def dist_loss(out: Tensor, target: Tensor) -> Tensor:
    """The paper's channel-wise distribution loss between rows `[tokens, channels]`."""
    mean_o, mean_t = out.mean(dim=0), target.mean(dim=0)
    var_o, var_t = out.var(dim=0, unbiased=False), target.var(dim=0, unbiased=False)
    return ((mean_o - mean_t).abs() + (var_o - var_t).abs()).mean()


def mse_loss(out: Tensor, target: Tensor) -> Tensor:
    return (out - target).pow(2).mean()


def _cast(obj: Any, dtype: torch.dtype) -> Any:
    """Floating tensors in nested tuples/lists/dicts cast to `dtype` (masks and rotary tables)."""
    if isinstance(obj, Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    return obj


@contextlib.contextmanager
def trainable_only(block: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    """Inside: the block in float32 with only `params` requiring gradients; afterwards every
    tensor gets its dtype and flag back (a trained norm is rounded to its dtype there)."""
    tensors = [*block.parameters(), *block.buffers()]
    dtypes = [t.dtype for t in tensors]
    flags = [p.requires_grad for p in block.parameters()]
    chosen = {id(p) for p in params}
    for t in tensors:
        if t.is_floating_point() and t.dtype != torch.float32:
            t.data = t.data.float()
    for p in block.parameters():
        p.requires_grad_(id(p) in chosen)
    try:
        yield
    finally:
        for t, dtype in zip(tensors, dtypes):
            if t.dtype != dtype:
                t.data = t.data.to(dtype)
        for p, flag in zip(block.parameters(), flags):
            p.requires_grad_(flag)
            p.grad = None


@register_method
class NormTweaking(QuantMethod):
    name = "NormTweaking"
    needs_calibration = True
    tunes_quantized = True
    prefers_quant_out = True
    float_quant = True
    Special = NormTweakingSpecial
    state_attrs = (*QuantMethod.state_attrs, "block_losses")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rates = self.special.rates()
        self.blocks = 0
        self.target: tuple[nn.Module, list[Tensor]] | None = None
        self.block_losses: list[dict[str, float]] = []
        """Per block: the loss before and after tweaking, and the learning rate kept (0: none)."""

    def prepare_model(self, mctx: ModelContext) -> None:
        self.blocks = len(mctx.adapter.get_blocks(mctx.model))

    def extra_device_bytes(self, model: nn.Module, adapter: ModelAdapter, calib_tokens: int) -> int:
        """The float block's outputs (the target), a float32 copy of the block, and activations for backward."""
        hidden = model.get_input_embeddings().embedding_dim
        block = adapter.get_blocks(model)[0]
        weights = sum(p.numel() for p in block.parameters())
        return calib_tokens * hidden * (next(model.parameters()).element_size() + 4) + 4 * weights

    def norm_params(self, ctx: BlockContext) -> list[nn.Parameter]:
        roles = ctx.adapter.block_roles
        names = [n for n in (roles.attn_norm, roles.mlp_norm) if n] if roles is not None else []
        if not names:
            raise ModelError(
                f"NormTweaking needs the norms of adapter {ctx.adapter.name}'s blocks; declare "
                f"block_roles attn_norm/mlp_norm in its family file, or use another method"
            )
        params = []
        for name in names:
            norm = ctx.block.get_submodule(name)
            params += [p for p in (getattr(norm, "weight", None), getattr(norm, "bias", None))
                       if isinstance(p, nn.Parameter)]
        return params

    def prepare_block(self, ctx: BlockContext) -> None:
        self.target = None
        if ctx.targets and self.special.epochs > 0:  # a block left in float is not tweaked
            with timed(self.stage_seconds, "target", ctx.device):
                self.target = (ctx.block, ctx.forward())

    def process_block(self, ctx: BlockContext) -> None:
        target, self.target = self.target, None
        if self.final:
            for name in ctx.targets:
                self.wrap_linear(ctx, name)
        if not ctx.targets or self.special.epochs == 0:
            return
        if target is None or target[0] is not ctx.block:
            raise RuntimeError("NormTweaking.process_block runs after its prepare_block of the same block")
        params = self.norm_params(ctx)
        calibrate_static_activations(ctx)  # static ranges, needed by the forwards below
        start = [p.detach().clone() for p in params]
        scale = 1 + self.special.gamma * (ctx.index / self.blocks if self.blocks else 0.0)
        with timed(self.stage_seconds, "tweak", ctx.device), trainable_only(ctx.block, params), \
                fake_weights_reused(ctx.block):
            before = self.loss(ctx, target[1])
            best, kept = (before, 0.0), start
            for rate in self.rates:
                with torch.no_grad():
                    for p, s in zip(params, start):
                        p.copy_(s)
                self.train(ctx, target[1], params, rate * scale)
                after = self.loss(ctx, target[1])
                if after < best[0]:
                    best, kept = (after, rate * scale), [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, k in zip(params, kept):
                    p.copy_(k)
        self.block_losses.append({"before": before, "after": best[0], "lr": best[1]})
        log.info("NormTweaking block %d: loss %.4g -> %.4g (lr %.3g)", ctx.index, before, best[0], best[1])

    def _autocast(self, ctx: BlockContext) -> contextlib.AbstractContextManager:
        if ctx.device.type == "cuda" and not self.special.deactive_amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _batch_loss(self, ctx: BlockContext, target: list[Tensor], index: int) -> Tensor:
        hidden, args, kwargs = ctx.inputs.batch(index, ctx.device)
        with self._autocast(ctx):
            out = ctx.block(hidden.float(), *_cast(args, torch.float32), **_cast(kwargs, torch.float32))
        out = out[0] if isinstance(out, tuple) else out
        mask = ctx.token_mask(index)
        rows = real_tokens(out.float(), mask)
        goal = real_tokens(target[index].to(ctx.device, torch.float32), mask)
        return (dist_loss if self.special.loss == "dist" else mse_loss)(rows, goal)

    @torch.no_grad()
    def loss(self, ctx: BlockContext, target: list[Tensor]) -> float:
        """The loss averaged over the calibration batches."""
        return sum(float(self._batch_loss(ctx, target, i)) for i in range(len(target))) / max(1, len(target))

    def train(self, ctx: BlockContext, target: list[Tensor], params: list[nn.Parameter], lr: float) -> None:
        optimizer = torch.optim.Adam(params, lr=lr)
        with torch.enable_grad():
            for _ in range(self.special.epochs):
                for i in range(len(target)):
                    loss = self._batch_loss(ctx, target, i)
                    if not torch.isfinite(loss):
                        log.warning("NormTweaking block %d: non-finite loss, training stopped", ctx.index)
                        return
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
