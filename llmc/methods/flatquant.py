"""FlatQuant: learned affine transforms that flatten weights and activations, trained per block.

Sun et al., 2024, "FlatQuant: Flatness Matters for LLM Quantization" (arXiv:2410.09426, ICML 2025).
W4A4 (per-channel weights, per-token activations) is hard because a few channels carry most of
the range; FlatQuant gives every group of linears that share one input (the adapter's
`LinearGroup`s: q/k/v, o, gate/up, down) its own learnable transform
`x -> (x * d)(P1 (x) P2)`, a Kronecker product of two small invertible matrices with a per-channel
scale (`llmc.quant.affine.KroneckerAffine`), applied online to the input, with the inverse in the
weights (`W diag(1/d) (P1 (x) P2)^{-T}`), so the float function is unchanged. Per block, like
OmniQuant, the transforms, the weight clipping (LWC: `FakeQuantLinear.learn_clipping`) and the
activation clipping (LAC: `FakeQuantLinear.act_clip`) are trained to make the fake-quantized
block's output match the float block's (MSE, AdamW, cosine schedule, straight-through rounding);
the float outputs are recorded before any method changes the block, and the next block is fed the
float outputs (the paper's procedure). At the end the inverses are merged into the weights in
float64, the weight ranges fixed from the merged weights, and `x P` stays online. A training step
computes these functions in few operators (`llmc.quant.affine.training_step` and `TrainedBlock`:
the block's matrices in batched solves without host syncs, each group's input transformed and
quantized once for all its linears, the weights of one input width quantized together; a fused
AdamW on CUDA): for a model of SmolLM2's size a step is bound by kernel launches, not arithmetic.
Such a model
exists only in memory: every save_* export is refused before calibration (`export_refusal`);
a resumed run gets the transforms back from its checkpoint (`restore_linear`). The transforms
start from random orthogonal matrices seeded by base.seed and the block index.

Where this differs from the paper's code: the o_proj transform is a Kronecker transform of
o_proj's input applied online as a whole (the code splits it into heads x head_dim and merges the
head_dim factor into v_proj's output rows, a deployment saving only), and it has a per-channel
scale too; the per-channel scales stay inside the online transform instead of being folded into
the preceding norm (the same function); an earlier method's online transform (a Hadamard) runs
before FlatQuant's (not restored on resume). KV-cache quantization is not done.

Config keys: `quant.weight.*` (int-quant; per_channel in the paper, per_group also works;
`calib_algo: learnable` needs `lwc`), `quant.act.*` (dynamic: per_token in the paper, or none for
weight-only), and under `quant.special` (the paper's argument names and its W4A4 scripts' values):
  epochs (int, 15): passes over the calibration batches per block (0: transforms stay at init).
  flat_lr (float, 5e-3; alias lr): AdamW learning rate of the transforms and scales; the clipping
    logits use 10 x flat_lr; cosine annealing to flat_lr * 1e-3.
  cali_trans (bool, true): train the Kronecker matrices (false: they keep their random orthogonal
    init).
  add_diag (bool, true): learn the per-channel scale d.
  diag_init (sq_style | one_style, sq_style): d starts at max|W|^(1-a) / max|X|^a (SmoothQuant's
    scale, inverted) or at 1.
  diag_alpha (float, 0.3): the `a` of sq_style.
  lwc (bool, true): learnable weight clipping (without it the ranges follow the weight, then
    quant.weight.calib_algo picks them from the merged weight).
  lac (bool, true): learnable activation clipping (one ratio pair per linear).
  direct_inv (bool, false): train P1, P2 directly and invert with torch.linalg.inv (default: the
    paper's SVD form, orthogonal factors from a Cayley map and learned singular values).
  warmup (bool, false): linear warm-up of the learning rate over the first 16 steps.
  deactive_amp (bool, false): on CUDA train without bf16 autocast (CPU never autocasts); the
    transforms always compute in float32.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import AliasChoices, BaseModel, ConfigDict, Field
from torch import Tensor, nn

from llmc.config.schema import QuantSection
from llmc.errors import ConfigError, NumericsError
from llmc.methods.base import QuantMethod, register_method
from llmc.methods.lifecycle import ModelContext
from llmc.methods.smoothquant import smooth_scales, weight_absmax
from llmc.models.adapter import ModelAdapter
from llmc.pipeline.blockwise import BlockContext, real_tokens
from llmc.quant.affine import KroneckerAffine, TrainedBlock, training_step
from llmc.quant.fake_linear import PRUNED, FakeQuantLinear
from llmc.quant.observers import LearnableClip

log = logging.getLogger("llmc")

FORMATS = {"save_trans": "a transformers folder", "save_fake": "a transformers folder", "save_vllm": "vLLM",
           "save_sgl": "SGLang", "save_autoawq": "AutoAWQ", "save_gptq": "GPTQ", "save_mlcllm": "MLC-LLM"}
UNCLIPPED = 30.0
"""Clip logit whose sigmoid is 1.0 in float32: an untrained clip that keeps the min/max range."""


class FlatQuantSpecial(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    epochs: int = Field(15, ge=0, description="Training passes over the calibration batches per block.")
    flat_lr: float = Field(5e-3, gt=0, validation_alias=AliasChoices("flat_lr", "lr"),
                           description="AdamW learning rate of the transforms (clipping: 10x).")
    cali_trans: bool = Field(True, description="Train the Kronecker matrices.")
    add_diag: bool = Field(True, description="Learn a per-channel scale in front of the Kronecker matrices.")
    diag_init: Literal["sq_style", "one_style"] = Field("sq_style", description="Initial per-channel scale.")
    diag_alpha: float = Field(0.3, ge=0.0, le=1.0, description="Migration strength of sq_style.")
    lwc: bool = Field(True, description="Learnable weight clipping.")
    lac: bool = Field(True, description="Learnable activation clipping.")
    direct_inv: bool = Field(False, description="Train the matrices directly (inverse by torch.linalg.inv).")
    warmup: bool = Field(False, description="Linear learning-rate warm-up over the first 16 steps.")
    deactive_amp: bool = Field(False, description="CUDA: train in float32 instead of bf16 autocast.")


@register_method
class FlatQuant(QuantMethod):
    name = "FlatQuant"
    quantizes_only = True
    Special = FlatQuantSpecial
    trains_clipping = True
    state_attrs = ("stage_seconds", "epoch_losses")

    def __init__(self, quant: QuantSection, special: dict | None = None, final: bool = True) -> None:
        super().__init__(quant, special, final)
        if quant.act is not None and quant.act.static:
            raise ConfigError("FlatQuant trains with dynamic activation ranges; set quant.act.static: false "
                              "(granularity per_token)")
        self.seed = 42
        self.epoch_losses: dict[int, list[float]] = {}
        """Per block, the mean training loss of every epoch (MSE against the float block's output)."""
        self._recorded: tuple[nn.Module, list[Tensor], dict[str, Tensor]] | None = None

    def export_refusal(self, save_flags: list[str]) -> str | None:
        if not save_flags:
            return None
        flag = save_flags[0]
        return (f"FlatQuant's learned online transforms cannot be exported to {FORMATS.get(flag, flag)} "
                f"({flag}); its results are measured in memory (fake quantization): remove save.{flag}")

    def extra_device_bytes(self, model: nn.Module, adapter: ModelAdapter, calib_tokens: int) -> int:
        """The float block's outputs (a copy when not shared with the pipeline's), float32 copies of a
        block's weights for the transformed, quantized and clipped weights of the training step, and
        the groups' weights concatenated (`TrainedBlock`)."""
        elem = next(model.parameters()).element_size()
        hidden = model.get_input_embeddings().embedding_dim
        block = adapter.get_blocks(model)[0]
        weights = sum(m.weight.numel() for m in block.modules() if isinstance(m, nn.Linear))
        return calib_tokens * hidden * elem + 3 * 4 * weights + elem * weights

    def prepare_model(self, mctx: ModelContext) -> None:
        self.seed = mctx.seed

    # ---- the float block's outputs (the training target) ------------------------------------

    @contextlib.contextmanager
    def _recording(self, ctx: BlockContext) -> Iterator[tuple[list[Tensor], dict[str, Tensor]]]:
        """Record, during the block forwards run in this context, the block's outputs (where the
        calibration inputs are kept) and, for sq_style scales, each group's per-channel max |input|."""
        outputs: list[Tensor] = []
        x_max: dict[str, Tensor] = {}

        def keep_output(_m: nn.Module, _args: tuple, out: object) -> None:
            out = out[0] if isinstance(out, tuple) else out
            outputs.append(out.detach().to(ctx.inputs.hidden[ctx.batch].device))

        def observe(name: str, rows: Tensor) -> None:
            if rows.numel():
                cur = rows.detach().abs().amax(dim=0).to(ctx.device, torch.float32)
                x_max[name] = cur if name not in x_max else torch.maximum(x_max[name], cur)

        sp = self.special
        sq_style = sp.add_diag and sp.diag_init == "sq_style"
        firsts = [next(iter(mods)) for _, mods in ctx.groups()] if sq_style else []
        handle = ctx.block.register_forward_hook(keep_output)
        try:
            with ctx.hook_inputs(firsts, observe, only_real_tokens=True):
                yield outputs, x_max
        finally:
            handle.remove()

    @contextlib.contextmanager
    def observe(self, ctx: BlockContext) -> Iterator[None]:
        """Record the target during the pipeline's own forward of the float block."""
        if ctx.inputs is None:
            yield
            return
        with self._recording(ctx) as (outputs, x_max):
            yield
        self._recorded = (ctx.block, outputs, x_max)

    def prepare_block(self, ctx: BlockContext) -> None:
        recorded, self._recorded = self._recorded, None
        if not ctx.targets:
            return
        if recorded is not None and recorded[0] is ctx.block and len(recorded[1]) == len(ctx.inputs):
            self._recorded = recorded
            return
        with self._recording(ctx) as (outputs, x_max):
            ctx.forward()
        self._recorded = (ctx.block, outputs, x_max)

    # ---- per block -----------------------------------------------------------------------------

    def process_block(self, ctx: BlockContext) -> None:
        if not ctx.targets:
            return
        pruned = [n for n in ctx.targets if getattr(ctx.block.get_submodule(n), PRUNED, False)]
        if pruned:
            raise ConfigError(f"FlatQuant's transforms would make the pruned weights of {pruned[0]} dense; "
                              f"use another quant.method with a sparse section, or remove the sparse section")
        recorded, self._recorded = self._recorded, None
        if recorded is None or recorded[0] is not ctx.block:
            self.prepare_block(ctx)
            recorded, self._recorded = self._recorded, None
        _, targets, x_max = recorded
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + ctx.index)
        sp = self.special
        groups: list[tuple[KroneckerAffine, list[FakeQuantLinear]]] = []
        wrapped: list[tuple[FakeQuantLinear, KroneckerAffine]] = []
        saved = {p: p.requires_grad for p in ctx.block.parameters()}
        for _group, mods in ctx.groups():
            names = list(mods)
            diag = None
            if sp.add_diag and sp.diag_init == "sq_style" and names[0] in x_max:
                w_max = weight_absmax(list(mods.values())).to(ctx.device)
                diag = 1.0 / smooth_scales(x_max[names[0]], w_max, sp.diag_alpha)
            transform = KroneckerAffine(mods[names[0]].in_features, diag=diag, add_diag=sp.add_diag,
                                        direct_inv=sp.direct_inv, generator=gen, device=ctx.device)
            groups.append((transform, []))
            for name in names:
                fq = self.wrap_linear(ctx, name)
                before = fq.input_transform  # an earlier method's online transform (a Hadamard) runs first
                fq.input_transform = transform if before is None else nn.Sequential(before, transform)
                fq.learn_clipping(4.0 if sp.lwc else UNCLIPPED)
                if sp.lac and self.act_quantizer is not None:
                    fq.act_clip = LearnableClip(1, 4.0, device=ctx.device)
                wrapped.append((fq, transform))
                groups[-1][1].append(fq)
        del x_max
        try:
            if wrapped:
                losses = self._train(ctx, targets, groups)
                self.epoch_losses[ctx.index] = losses
                if losses:
                    log.info("FlatQuant block %d: loss %.3g -> %.3g over %d epochs", ctx.index, losses[0],
                             losses[-1], len(losses))
            del targets
            self._merge(ctx, wrapped)
        finally:
            for p in ctx.block.parameters():
                p.requires_grad_(saved.get(p, False))

    def _train(self, ctx: BlockContext, targets: list[Tensor],
               groups: list[tuple[KroneckerAffine, list[FakeQuantLinear]]]) -> list[float]:
        transforms = [t for t, _ in groups]
        linears = [fq for _, fqs in groups for fq in fqs]
        sp, lr = self.special, self.special.flat_lr
        params = []
        if sp.cali_trans:
            params.append({"params": [p for t in transforms for p in t.matrix_parameters()], "lr": lr})
        if sp.add_diag:
            params.append({"params": [t.diag_scale for t in transforms], "lr": lr})
        if sp.lwc:
            params.append({"params": [p for m in linears for p in m.weight_clip.parameters()], "lr": 10 * lr})
        if sp.lac and self.act_quantizer is not None:
            params.append({"params": [p for m in linears for p in m.act_clip.parameters()], "lr": 10 * lr})
        params = [g for g in params if g["params"]]
        trained_ids = {id(p) for g in params for p in g["params"]}
        steps = sp.epochs * len(ctx.inputs)
        if not params or not steps:
            return []
        for p in ctx.block.parameters():
            p.requires_grad_(id(p) in trained_ids)
        # CUDA: one fused kernel for the whole update (the step is bound by kernel launches there).
        optimizer = torch.optim.AdamW(params, fused=True if ctx.device.type == "cuda" else None)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=lr * 1e-3)
        if sp.warmup:
            warm = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=16)
            schedule = torch.optim.lr_scheduler.ChainedScheduler([warm, schedule])
        with TrainedBlock(groups) as trained, torch.enable_grad():
            return self._epochs(ctx, targets, transforms, trained, optimizer, schedule)

    def _epochs(self, ctx: BlockContext, targets: list[Tensor], transforms: list[KroneckerAffine],
                trained: TrainedBlock, optimizer: torch.optim.Optimizer,
                schedule: torch.optim.lr_scheduler.LRScheduler) -> list[float]:
        sp, losses = self.special, []
        amp = ctx.device.type == "cuda" and not sp.deactive_amp
        for _ in range(sp.epochs):
            total = torch.zeros((), device=ctx.device)
            for i in range(len(ctx.inputs)):
                ctx.batch = i
                hidden, args, kwargs = ctx.inputs.batch(i, ctx.device)
                with contextlib.ExitStack() as step:
                    step.enter_context(torch.autocast(ctx.device.type, torch.bfloat16, enabled=amp))
                    step.enter_context(training_step(transforms))
                    step.enter_context(trained.step())
                    out = ctx.block(hidden, *args, **kwargs)
                out = out[0] if isinstance(out, tuple) else out
                mask = ctx.token_mask(i)
                target = real_tokens(targets[i].to(ctx.device, torch.float32), mask)
                loss = F.mse_loss(real_tokens(out.float(), mask), target)
                total += loss.detach()
                optimizer.zero_grad(set_to_none=True)
                # The paper's code steps along the gradient of log(MSE): scale-free across blocks.
                (loss / loss.detach().clamp(min=1e-30)).backward()
                optimizer.step()
                schedule.step()
            losses.append(float(total) / len(ctx.inputs))
            if not math.isfinite(losses[-1]):
                raise NumericsError(f"FlatQuant's training loss became NaN/Inf in block {ctx.index}; "
                                    f"lower quant.special.flat_lr, or set deactive_amp: true")
        return losses

    @torch.no_grad()
    def _merge(self, ctx: BlockContext, wrapped: list[tuple[FakeQuantLinear, KroneckerAffine]]) -> None:
        """Exact inverses into the weights, quantization ranges from the merged weights, training state
        dropped."""
        for _, transform in wrapped:
            transform.freeze()
        for fq, transform in wrapped:
            merged = transform.merge_weight(fq.weight)
            if not torch.isfinite(merged).all():
                raise NumericsError(f"FlatQuant's transform of block {ctx.index} became singular; lower "
                                    f"quant.special.flat_lr")
            fq.weight.copy_(merged)
            if self.special.lwc:
                fq.freeze_clip()
            else:
                fq.weight_clip = None
                fq.calibrate_weight()
            if fq.act_clip is not None:
                fq.act_clip.requires_grad_(False)

    def restore_linear(self, block: nn.Module, name: str, cls: type[FakeQuantLinear]) -> FakeQuantLinear:
        """A resumed run: the linear with a frozen identity transform and an activation clip of the
        trained shapes; the checkpoint then loads the trained values into them."""
        fq = super().restore_linear(block, name, cls)
        fq.input_transform = KroneckerAffine.frozen(fq.in_features, self.special.add_diag, fq.weight.device)
        if self.special.lac and self.act_quantizer is not None:
            fq.act_clip = LearnableClip(1, 4.0, device=fq.weight.device).requires_grad_(False)
        return fq
