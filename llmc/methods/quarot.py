"""QuaRot: rotate the residual stream so activations lose their outlier channels, then quantize.

Ashkboos, Mohtashami, Croci, Li, Cameron, Jaggi, Alistarh, Hoefler and Hensman, 2024, "QuaRot:
Outlier-Free 4-Bit Inference in Rotated LLMs" (arXiv:2404.00456). Multiplying the residual stream
by an orthogonal Q leaves an RMSNorm model's function unchanged once each norm's weight is folded
into the linears reading it, while a (randomized) Hadamard Q spreads every outlier channel over
all channels, so weights and activations quantize to 4 bits with per-channel/per-token scales.

Before the block inputs are captured (`prepare_model`, `llmc.methods.rotation`): untie the LM head
from the embedding; fold every norm's weight into its readers (attention and MLP inputs, MoE
routers, the LM head); rotate the embedding, every block's stream readers (columns) and writers
(rows and biases) and the LM head by Q, in float64 on the run's device, one block at a time.
Values and the attention output projection are rotated per head by a Hadamard matrix of the head
size (where attn_v is a plain value projection). With `online_rotate`, each MLP output projection
(down_proj) gets `W <- W H` and an online Hadamard transform on its input (`OnlineHadamard`), so
its activations are outlier-free too (QuaRot's W4A4 recipe). Alone, QuaRot then quantizes every
target like RTN; in `method: [QuaRot, GPTQ]` it only transforms and GPTQ quantizes.

Families whose norms do not commute with a rotation (LayerNorm: OPT, BLOOM, Falcon, Phi, StableLM,
StarCoder, StarCoder2) or that normalize a branch's output (Gemma 2/3) are refused, named.

Config keys (ModelTC/llmc's), under `quant.special` (`quant.special.QuaRot` in a composition):
  rotate_mode (hadamard | random, default hadamard): Q is a random Hadamard matrix
    `diag(random signs) H / sqrt(n)`, or a random orthogonal matrix (QR of a Gaussian); seeded by base.seed.
  fp32_had (bool, default true): compute the online Hadamard transform in float32.
  online_rotate (bool, default true): the online Hadamard before down_proj. A plain transformers
    checkpoint cannot hold it: save_trans, save_fake, save_autoawq, save_mlcllm and save_gptq are
    refused; save_vllm/save_sgl write it as a compressed-tensors transform_config.
and `quant.weight.*`, `quant.act.*` (W4A4: per_channel 4-bit weights, per_token 4-bit activations).
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from llmc.errors import ConfigError
from llmc.methods.base import QuantMethod, register_method
from llmc.methods.lifecycle import ModelContext
from llmc.methods.rotation import (
    BlockPlan,
    block_plan,
    check_rotatable,
    heads_rotatable,
    present_names,
    rotate_block,
    rows,
    transform_linear,
    transform_rows_chunked,
    untie_head,
)
from llmc.models.adapter import INDEX, get_submodule_or_none
from llmc.pipeline.blockwise import BlockContext
from llmc.quant.fake_linear import set_input_transform
from llmc.quant.hadamard import OnlineHadamard, orthogonal_hadamard, random_orthogonal

log = logging.getLogger("llmc")

CT_FLAGS = ("save_vllm", "save_sgl")
"""Outputs that carry the online Hadamard (compressed-tensors' transform_config, see llmc.export.ct_transform)."""
PLAIN_FORMATS = {
    "save_trans": "a plain transformers checkpoint",
    "save_fake": "a plain transformers checkpoint",
    "save_autoawq": "the AutoAWQ format",
    "save_mlcllm": "MLC-LLM's AWQ layout",
    "save_gptq": "the GPTQ format",
}


class QuaRotSpecial(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rotate_mode: Literal["hadamard", "random"] = Field("hadamard", description="Random Hadamard or random orthogonal Q.")
    fp32_had: bool = Field(True, description="Compute the online Hadamard transform in float32.")
    online_rotate: bool = Field(True, description="Online Hadamard transform before each MLP output projection.")


def residual_rotation(n: int, mode: str, seed: int) -> Tensor:
    """The residual stream's Q (float64): `diag(signs) H / sqrt(n)` or a random orthogonal matrix."""
    return orthogonal_hadamard(n, seed) if mode == "hadamard" else random_orthogonal(n, seed)


@register_method
class QuaRot(QuantMethod):
    name = "QuaRot"
    needs_calibration = False
    data_parallel = True  # the rotation is seeded by base.seed: the same on every rank
    Special = QuaRotSpecial
    save_flags: tuple[str, ...] = ()

    def special_key(self) -> str:
        return f"quant.special.{self.name}" if len(self.quant.methods) > 1 else "quant.special"

    def export_refusal(self, save_flags: list[str]) -> str | None:
        self.save_flags = tuple(save_flags)  # the compressed-tensors layout is checked on the model (prepare_model)
        if not self.special.online_rotate:
            return None
        for flag in save_flags:
            if flag in PLAIN_FORMATS:
                return (f"save.{flag}: QuaRot online_rotate: true puts a Hadamard transform before down_proj that "
                        f"{PLAIN_FORMATS[flag]} cannot carry; set {self.special_key()}.online_rotate: false "
                        f"(weight-only) or write save_vllm/save_sgl (compressed-tensors carries it as a transform)")
        return None

    def check_online_export(self, adapter, plans: list[BlockPlan], blocks: nn.ModuleList) -> None:
        """vLLM applies compressed-tensors' online transforms to plain bias-free linears only."""
        flags = [f for f in self.save_flags if f in CT_FLAGS]
        if not flags or not self.special.online_rotate:
            return
        experts = tuple(p for p in adapter.block_roles.mlp_out if INDEX in p)
        why = None
        if any(present_names(block, experts) for block in blocks):
            why = "vLLM applies online transforms to plain linears, not to MoE experts"
        elif any(getattr(block.get_submodule(n), "bias", None) is not None
                 for block, plan in zip(blocks, plans) for n in plan.mlp_out):
            why = "vLLM's online transforms take no bias on the linear"
        if why:
            raise ConfigError(f"save.{flags[0]}: QuaRot online_rotate: true on {adapter.name}: {why}; set "
                              f"{self.special_key()}.online_rotate: false")

    @torch.no_grad()
    def prepare_model(self, mctx: ModelContext) -> None:
        model, adapter, device = mctx.model, mctx.adapter, mctx.device
        check_rotatable(model, adapter, self.name)
        blocks = adapter.get_blocks(model)
        plans = [block_plan(adapter, block) for block in blocks]
        self.check_online_export(adapter, plans, blocks)
        untied = untie_head(model, adapter)
        embedding, head = adapter.role(model, "embedding"), adapter.role(model, "lm_head")
        n = embedding.weight.shape[1]
        q = residual_rotation(n, self.special.rotate_mode, mctx.seed).to(device)
        heads: dict[int, Tensor] = {}
        online: dict[int, Tensor] = {}
        rotated_heads = 0
        for block, plan in zip(blocks, plans):
            hd = heads_rotatable(model, adapter, block, plan)
            if hd is not None and hd not in heads:
                heads[hd] = orthogonal_hadamard(hd).to(device)
            transforms = {}
            if self.special.online_rotate:
                for name in plan.mlp_out:
                    width = block.get_submodule(name).in_features
                    transforms[name] = OnlineHadamard(width, fp32=self.special.fp32_had, seed=mctx.seed)
                    if width not in online:
                        online[width] = transforms[name].matrix().to(device)
            rotate_block(block, plan, q, device, head=heads.get(hd) if hd else None,
                         online={name: online[t.n] for name, t in transforms.items()})
            for name, transform in transforms.items():
                set_input_transform(block, name, transform)
            rotated_heads += hd is not None
        final_weight = getattr(adapter.role(model, "final_norm"), "weight", None)
        transform_rows_chunked(head.weight, q, device, scale=None if final_weight is None else final_weight.clone())
        if final_weight is not None:
            final_weight.fill_(1.0)
        transform_rows_chunked(embedding.weight, q, device)
        for name in adapter.roles.stream_inputs:
            module = get_submodule_or_none(model, name)
            if module is not None:
                transform_linear(module, device, left=rows(q))
        mctx.results[self.name] = {"rotate_mode": self.special.rotate_mode, "hidden": n, "untied_lm_head": untied,
                                   "heads_rotated_blocks": rotated_heads, "online_rotate": self.special.online_rotate}
        log.info("QuaRot: residual stream rotated (%s, %d), values/output per head in %d of %d blocks%s%s",
                 self.special.rotate_mode, n, rotated_heads, len(blocks),
                 ", online Hadamard before the MLP output projections" if self.special.online_rotate else "",
                 ", LM head untied from the embedding" if untied else "")

    def process_block(self, ctx: BlockContext) -> None:
        for name in ctx.targets:
            self.wrap_linear(ctx, name)

