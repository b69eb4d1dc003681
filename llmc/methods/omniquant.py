"""OmniQuant: block-wise training of learnable weight clipping (LWC) and learnable equivalent
transformations (LET). Shao, Chen, Zhang, Xu, Zhao, Li, Zhang, Gao, Qiao and Luo, 2023, "OmniQuant:
Omnidirectionally Calibrated Quantization for Large Language Models", arXiv:2308.13137 (ICLR 2024).

Per block:

1. Target (`prepare_block`, before any method changes the block): the float block's outputs. As in
   the paper's code, the block trains on the inputs the pipeline gives it (with `quant_out`, this
   method's default, the quantized model's activations) against the float model's own activations:
   the float block applied to the float chain of hidden states, which this method carries from block
   to block (one extra set of hidden states). `aug_loss` adds the error against the float block
   applied to the training inputs (the paper's `fp_inps_2`). A resumed run restarts the float chain
   from the inputs it resumes with.
2. LET (`let`, llmc.methods.let): per-channel scales (and shifts, `use_shift`) between each norm or
   v_proj and the linears it feeds, initialised as SmoothQuant (`alpha`, activation and weight
   absmax over the calibration tokens), and the q/k scaling where it is exact.
3. LWC (`lwc`): every target becomes a FakeQuantLinear with a `LearnableClip` (per quantization row,
   `max * sigmoid(gamma)`, `min * sigmoid(beta)`, logits from 4.0, or from a per-row search of the
   clip ratio with the least weight error with `search_clip_init`). LWC trains whatever
   `quant.weight.calib_algo` says; `calib_algo: learnable` documents it and requires `lwc: true`.
4. Training: AdamW (`lwc_lr`, `let_lr`, weight decay `wd`) over `epochs` passes of the calibration
   batches, one step per batch, minimizing the mean squared error of the quantized block's output
   (real tokens only), gradients through the straight-through rounding. The block's parameters stay
   as they are; LET is applied functionally on each step from float32 copies. float32 on CPU; on CUDA
   under bf16 autocast unless `deactive_amp: true`. Static activation ranges are dynamic (per
   tensor) while training and calibrated by the pipeline afterwards.
5. LET folded into the weights and norms (exactly the trained values), clipping frozen into the
   FakeQuantLinears' scales (`freeze_clip`); without LWC the scales are recomputed from the folded
   weights with `calib_algo`.

OmniQuant quantizes the block itself, so it must be the quantizing method of a composition.

Config keys (ModelTC/llmc's names), `quant.special`: epochs (20: the paper's W4A16/W-A setting; 40
for W2), lwc (true), let (default: true with `quant.act`, false weight-only, as the paper's
scripts), lwc_lr (1e-2), let_lr (5e-3; the paper uses 1e-3 for W4A4), use_shift (default as let;
applied only where the producer and every reader of the group have a bias, see llmc.methods.let),
alpha (0.5; 0.75 for W4A4 in the paper), aug_loss (false), wd (0), deactive_amp (false: the paper's
AMP), search_clip_init (false).
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from llmc.config.schema import QuantSection
from llmc.errors import ConfigError, NumericsError
from llmc.methods.base import QuantMethod, register_method
from llmc.methods.let import LetTransform, QKScale, init_smooth, let_groups, qk_candidates
from llmc.methods.lifecycle import ModelContext
from llmc.models.adapter import ModelAdapter
from llmc.pipeline.blockwise import BlockContext, real_tokens, run_block, timed
from llmc.quant.fake_linear import FakeQuantLinear, quant_disabled
from llmc.quant.observers import LearnableClip

log = logging.getLogger("llmc")

QK_TOLERANCE = 1e-3
"""Largest relative change of the block's update (output less input) a q/k scaling may cause on its
check batch (float32; an exact scaling gives about 1e-6, a wrong one changes attention outright)."""


class OmniQuantSpecial(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(20, ge=0, description="Passes over the calibration batches per block (0: no training).")
    lwc: bool = Field(True, description="Learnable weight clipping.")
    let: bool | None = Field(None, description="Learnable equivalent transformation; default: with quant.act.")
    lwc_lr: float = Field(1e-2, gt=0, description="AdamW learning rate of the clipping logits.")
    let_lr: float = Field(5e-3, gt=0, description="AdamW learning rate of the LET scales and shifts.")
    use_shift: bool | None = Field(None, description="LET shifts where biases absorb them; default: as let.")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="SmoothQuant migration strength of the LET init.")
    aug_loss: bool = Field(False, description="Also fit the float block's output on the training inputs.")
    wd: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    deactive_amp: bool = Field(False, description="Train in float32 on CUDA too (default: bf16 autocast).")
    search_clip_init: bool = Field(False, description="Start LWC from a per-row clip-ratio search.")


@register_method
class OmniQuant(QuantMethod):
    name = "OmniQuant"
    quantizes_only = True
    Special = OmniQuantSpecial
    prefers_quant_out = True
    trains_clipping = True
    state_attrs = ("stage_seconds", "losses")

    def __init__(self, quant: QuantSection, special: dict | None = None, final: bool = True) -> None:
        super().__init__(quant, special, final)
        sp = self.special
        weight_act = quant.act is not None
        self.let = weight_act if sp.let is None else sp.let
        self.use_shift = self.let and (weight_act if sp.use_shift is None else sp.use_shift)
        if sp.epochs and not (sp.lwc or self.let):
            raise ConfigError(
                f"quant.special.epochs {sp.epochs} trains nothing with lwc and let both false; "
                "set lwc: true or let: true, or epochs: 0"
            )
        self.losses: list[list[float]] = []
        """Per processed block: [index, first epoch's mean loss, last epoch's]."""
        self._fp: list[Tensor] | None = None
        self._fp_block = -1
        self._targets: list[Tensor] | None = None
        self._aug: list[Tensor] | None = None

    def extra_device_bytes(self, model: nn.Module, adapter: ModelAdapter, calib_tokens: int) -> int:
        """The float targets (and the float chain beside them while the next ones are computed), and
        training: float32 copies, transformed copies and gradients of the block's parameters, and
        one batch's saved activations in float32 (a batch of at most 4096 tokens assumed)."""
        elem = next(model.parameters()).element_size()
        hidden = model.get_input_embeddings().embedding_dim
        targets = calib_tokens * hidden * elem * (3 if self.special.aug_loss else 2)
        block = adapter.get_blocks(model)[0]
        params = sum(p.numel() for p in block.parameters())
        linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
        widths = sum(m.in_features + m.out_features for m in linears)
        return targets + 3 * 4 * params + 2 * 4 * min(calib_tokens, 4096) * widths

    # ---- lifecycle ---------------------------------------------------------------------------

    @torch.no_grad()
    def prepare_block(self, ctx: BlockContext) -> None:
        if ctx.inputs is None:
            return
        fp = self._fp if self._fp_block == ctx.index else None
        self._fp = None
        if fp is not None and all(torch.equal(a, b) for a, b in zip(fp, ctx.inputs.hidden)):
            fp = None  # the pipeline feeds float outputs (no quant_out): one chain is enough
        with timed(self.stage_seconds, "targets", ctx.device):
            own = ctx.forward() if fp is None or self.special.aug_loss else None
            target = own if fp is None else run_block(ctx.block, ctx.inputs.with_hidden(fp), ctx.device)
        del fp
        self._targets, self._aug = target, own if self.special.aug_loss else None
        self._fp, self._fp_block = target, ctx.index + 1

    def process_block(self, ctx: BlockContext) -> None:
        targets, aug = self._targets, self._aug
        self._targets = self._aug = None
        if not ctx.targets:
            return
        if targets is None:
            raise RuntimeError("OmniQuant.process_block before prepare_block recorded the float targets")
        with timed(self.stage_seconds, "setup", ctx.device):
            trainer = self.setup(ctx)
        with timed(self.stage_seconds, "train", ctx.device):
            trainer.train(targets, aug)
        del targets, aug
        trainer.finish()

    def finish_model(self, mctx: ModelContext) -> None:
        self._fp = None

    def setup(self, ctx: BlockContext) -> BlockTrainer:
        """Wrap the block's targets and attach LET and LWC, ready to train."""
        sp = self.special
        plan = let_groups(ctx) if self.let else []
        stats = _input_ranges(ctx, [linears[0] for _, linears, _, _ in plan]) if plan else {}
        smooths = [init_smooth(ctx, prod, linears, readers, prev, stats[linears[0]], sp.alpha, self.use_shift)
                   for prod, linears, readers, prev in plan if linears[0] in stats]
        fqs = [self.wrap_linear(ctx, name) for name in ctx.targets]
        trainer = BlockTrainer(self, ctx, fqs)
        qk = self._pick_qk(trainer) if self.let else None
        trainer.let = LetTransform(smooths, qk, trainer.dtypes) if smooths or qk else None
        weights = trainer.transformed_weights()
        for name, fq in zip(ctx.targets, fqs):
            if sp.lwc:
                clip = fq.learn_clipping()
                if sp.search_clip_init:
                    _search_clip(fq, weights.get(f"{name}.weight", trainer.base[f"{name}.weight"]), clip)
            else:  # the min/max of the transformed weight while LET trains
                fq.learn_clipping(math.inf).requires_grad_(False)
        return trainer

    @torch.no_grad()
    def _pick_qk(self, trainer: BlockTrainer) -> QKScale | None:
        """The first q/k scaling tying that leaves the float block unchanged on random scales."""
        ctx = trainer.ctx
        candidates = qk_candidates(ctx)
        if not candidates:
            return None
        hidden, args, kwargs = trainer.batch(0)
        exact = {n: torch.float32 for n in trainer.dtypes}
        gen = torch.Generator().manual_seed(ctx.index)
        with quant_disabled(ctx.block):
            ref = trainer.call(trainer.base, hidden, args, kwargs)
            update = (ref - hidden).norm()
            for qk in candidates:
                qk.scale.copy_(torch.empty(qk.scale.shape).uniform_(-1, 1, generator=gen).exp())
                params = {**trainer.base, **LetTransform([], qk, exact).transformed(trainer.base)}
                err = float((trainer.call(params, hidden, args, kwargs) - ref).norm() / update)
                qk.scale.fill_(1.0)
                if err < QK_TOLERANCE:
                    return qk
        log.debug("OmniQuant: block %d leaves q/k unscaled (no exact tying)", ctx.index)
        return None


class BlockTrainer:
    """One block's OmniQuant training: the functional forward, the loop, and the fold."""

    def __init__(self, method: OmniQuant, ctx: BlockContext, fqs: list[FakeQuantLinear]) -> None:
        self.method, self.ctx, self.fqs = method, ctx, fqs
        self.dtypes = {n: p.dtype for n, p in ctx.block.named_parameters()}
        self.base = {n: p.detach().float() for n, p in ctx.block.named_parameters()}
        """float32 copies (views where already float32) of the block's parameters: LET's base."""
        self.base.update({n: b.float() for n, b in ctx.block.named_buffers()
                          if b.is_floating_point() and b.dtype != torch.float32})
        self.let: LetTransform | None = None

    def batch(self, index: int) -> tuple[Tensor, tuple, dict]:
        hidden, args, kwargs = self.ctx.inputs.batch(index, self.ctx.device)
        return _float32(hidden), _float32(args), _float32(kwargs)

    def call(self, params: dict[str, Tensor], hidden: Tensor, args: tuple, kwargs: dict) -> Tensor:
        out = torch.func.functional_call(self.ctx.block, params, (hidden, *args), kwargs)
        return out[0] if isinstance(out, tuple) else out

    def transformed_weights(self) -> dict[str, Tensor]:
        with torch.no_grad():
            return self.let.transformed(self.base) if self.let is not None else {}

    def forward(self, index: int, amp: bool = False) -> Tensor:
        """The block's output on calibration batch `index`, LET applied on the fly (float32, or
        under bf16 autocast with `amp`; the transformed parameters are float32 either way, as folded)."""
        hidden, args, kwargs = self.batch(index)
        params = {**self.base, **self.let.transformed(self.base)} if self.let is not None else self.base
        with torch.autocast("cuda", torch.bfloat16) if amp else contextlib.nullcontext():
            return self.call(params, hidden, args, kwargs)

    def train(self, targets: list[Tensor], aug: list[Tensor] | None) -> None:
        ctx, sp = self.ctx, self.method.special
        groups = []
        clips = [p for fq in self.fqs if fq.weight_clip is not None for p in fq.weight_clip.parameters()
                 if p.requires_grad]
        if clips:
            groups.append({"params": clips, "lr": sp.lwc_lr})
        if self.let is not None:
            groups.append({"params": list(self.let.parameters()), "lr": sp.let_lr})
        if not groups or not sp.epochs:
            return
        optimizer = torch.optim.AdamW(groups, weight_decay=sp.wd)
        amp = ctx.device.type == "cuda" and not sp.deactive_amp
        static = [fq for fq in self.fqs if fq.act_static]
        for fq in static:
            fq.act_static = False
        means = []
        try:
            with torch.enable_grad():
                for _ in range(sp.epochs):
                    total = 0.0
                    for i in range(len(ctx.inputs)):
                        ctx.batch = i
                        out = self.forward(i, amp)
                        mask = ctx.token_mask(i)
                        loss = _mse(out, targets[i], mask)
                        if aug is not None:
                            loss = loss + _mse(out, aug[i], mask)
                        if not torch.isfinite(loss):
                            raise NumericsError(
                                f"OmniQuant's loss is NaN/Inf in block {ctx.index}; set quant.special.deactive_amp: "
                                "true or lower lwc_lr/let_lr"
                            )
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                        total += float(loss.detach())
                    means.append(total / max(1, len(ctx.inputs)))
        finally:
            for fq in static:
                fq.act_static = True
            del optimizer
        self.method.losses.append([ctx.index, means[0], means[-1]])
        log.info("OmniQuant block %d: loss %.4g -> %.4g", ctx.index, means[0], means[-1])

    @torch.no_grad()
    def finish(self) -> None:
        """Fold LET into the block and freeze the clipping into the linears' scales."""
        if self.let is not None:
            self.let.fold(self.ctx.block, self.base)
            self.let = None
        for fq in self.fqs:
            if self.method.special.lwc:
                fq.freeze_clip()
            else:
                fq.weight_clip = None
                fq.calibrate_weight()
        self.base = {}


# ---- helpers -----------------------------------------------------------------------------------


@torch.no_grad()
def _input_ranges(ctx: BlockContext, names: list[str]) -> dict[str, tuple[Tensor, Tensor]]:
    """Per input channel (min, max) of each named linear over the calibration set's real tokens."""
    ranges: dict[str, tuple[Tensor, Tensor]] = {}

    def observe(name: str, rows: Tensor) -> None:
        if rows.numel() == 0:
            return
        lo, hi = rows.amin(dim=0).to(ctx.device, torch.float32), rows.amax(dim=0).to(ctx.device, torch.float32)
        if name in ranges:
            lo, hi = torch.minimum(ranges[name][0], lo), torch.maximum(ranges[name][1], hi)
        ranges[name] = (lo, hi)

    with ctx.hook_inputs(names, observe, only_real_tokens=True):
        ctx.forward_until(None)
    return ranges


@torch.no_grad()
def _search_clip(fq: FakeQuantLinear, weight: Tensor, clip: LearnableClip, init: float = 4.0) -> None:
    """Start the clipping logits of each row from the shrink ratio (1, 0.99, ..., 0.2) of its range
    with the least squared weight quantization error (never above the default start, sigmoid(init))."""
    wq = fq.weight_quantizer
    rows = wq.rows(weight.float())
    xmin, xmax = rows.amin(dim=1, keepdim=True), rows.amax(dim=1, keepdim=True)
    best, best_err = torch.ones_like(xmax), torch.full_like(xmax, math.inf)
    for i in range(81):
        ratio = 1 - i / 100
        err = (wq.quant_dequant(rows, *wq.params_from_range(xmin * ratio, xmax * ratio)) - rows).pow(2).sum(1, True)
        better = err < best_err
        best, best_err = torch.where(better, ratio, best), torch.where(better, err, best_err)
    logits = torch.log(best / (1 - best).clamp(min=1e-12)).clamp(max=init)
    clip.upper.copy_(logits)
    clip.lower.copy_(logits)


def _mse(out: Tensor, target: Tensor, mask: Tensor | None) -> Tensor:
    return real_tokens(out.float() - target.to(out.device).float(), mask).pow(2).mean()


def _float32(obj):
    """Floating tensors in nested tuples/lists/dicts as float32 (the training's compute dtype)."""
    if isinstance(obj, Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        return tuple(_float32(o) for o in obj)
    if isinstance(obj, list):
        return [_float32(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _float32(v) for k, v in obj.items()}
    return obj
