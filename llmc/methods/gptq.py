"""GPTQ: quantize weights column by column, spreading each column's rounding error over the
columns not yet quantized with the inverse Hessian of the layer's reconstruction loss.

Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", arXiv:2210.17323 (Algorithm 1: lazy batch updates over blocks of columns,
Cholesky form of the inverse Hessian; "act-order" and static groups from the reference code).

Per group of linears sharing an input, H = 2/n * sum X^T X over the n real (non-padding)
calibration tokens. With `true_sequential`, groups are quantized in execution order and each
Hessian is measured with the earlier groups already quantized. The linear's float weight
becomes the GPTQ result Q, and its fake-quant parameters are the ones GPTQ used, so
`fake_weight()` reproduces Q exactly (the "transformed" model is therefore Q too).

Config keys: `quant.weight.{bit, symmetric, granularity, group_size, calib_algo, partial_group}`,
`quant.act.*` (applied to the linears' inputs as for RTN), and `quant.special`:
  percdamp (0.01): damping added to diag(H), as a fraction of its mean;
  blocksize (128): columns per lazy batch update;
  actorder (false): quantize columns in order of decreasing diag(H);
  static_groups (false): per_group params from the original weight up front, so groups stay
    contiguous under actorder;
  true_sequential (true): measure each group's Hessian after quantizing the groups before it.
`quant.quant_out` defaults to true with GPTQ: each block's Hessians come from the quantized
earlier blocks' outputs, so GPTQ also corrects the error they pass on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from llmc.errors import NumericsError
from llmc.methods.base import QuantMethod, register_method
from llmc.methods.gptq_block import quantize_block
from llmc.methods.hessian import group_hessians, inverse_hessian_cholesky
from llmc.methods.sparse_base import is_pruned
from llmc.models.adapter import ModelAdapter
from llmc.pipeline.blockwise import BlockContext, timed
from llmc.quant.fake_linear import FakeQuantLinear
from llmc.quant.quantizer import IntQuantizer


class GptqSpecial(BaseModel):
    model_config = ConfigDict(extra="forbid")

    percdamp: float = Field(0.01, gt=0, description="Damping of diag(H), as a fraction of its mean.")
    blocksize: int = Field(128, ge=1, description="Columns per lazy batch update.")
    actorder: bool = Field(False, description="Quantize columns in order of decreasing diag(H).")
    static_groups: bool = Field(False, description="per_group params from the original weight, up front.")
    true_sequential: bool = Field(True, description="Hessian of each group after quantizing earlier groups.")


@dataclass
class GptqResult:
    weight: Tensor
    """Q, the dequantized GPTQ weight `[out, in]` (float32, original column order)."""
    scale: Tensor
    """`[rows, 1]` in the rows() layout of the quantizer; per_group: row `o * n_groups + g` for group g."""
    zero: Tensor
    g_idx: Tensor
    """`[in]` int64: the group of each input column (all 0 unless per_group)."""


def qdq_elementwise(w: Tensor, scale: Tensor, zero: Tensor, quantizer: IntQuantizer) -> Tensor:
    """Quantize-dequantize with broadcast params; the same arithmetic as `IntQuantizer.quant_dequant`."""
    q = torch.clamp(torch.round(w / scale) + zero, quantizer.qmin, quantizer.qmax)
    return (q - zero) * scale


def natural_g_idx(columns: int, quantizer: IntQuantizer, device: torch.device | None = None) -> Tensor:
    """The group of each column when groups are contiguous (what FakeQuantLinear assumes)."""
    idx = torch.arange(columns, device=device)
    return idx // quantizer.group_size if quantizer.granularity == "per_group" else torch.zeros_like(idx)


@torch.no_grad()
def gptq_quantize(
    weight: Tensor,
    hessian: Tensor,
    quantizer: IntQuantizer,
    blocksize: int = 128,
    percdamp: float = 0.01,
    actorder: bool = False,
    static_groups: bool = False,
    consume_hessian: bool = False,
    keep_zeros: bool = False,
) -> GptqResult:
    """GPTQ for one weight `[out, in]` given the Hessian `[in, in]` of its input (math in float32).

    With `consume_hessian` the float32 Hessian is damped in place instead of copied (one
    `[in, in]` less at the peak: 3 GiB for a 70B down_proj); the caller must not reuse it.
    With `keep_zeros` (a pruned weight) every zero of `weight` stays zero in Q.
    """
    W = weight.detach().float().clone()
    pruned = W == 0 if keep_zeros else None
    H = hessian.detach().to(W.device, torch.float32)
    if H.data_ptr() == hessian.data_ptr() and not consume_hessian:
        H = H.clone()
    cols = W.shape[1]
    # A column whose input is always zero does not matter; zero it so it cannot widen a range.
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    grouped = quantizer.granularity == "per_group"
    gs = quantizer.group_size if grouped else cols
    n_groups = -(-cols // gs)
    # Each group's params are per row over its columns: a per_channel quantizer on a column slice.
    slice_quantizer = dataclasses.replace(quantizer, granularity="per_channel", group_size=-1)
    params: list[tuple[Tensor, Tensor] | None] = [None] * n_groups
    if not grouped:
        scale, zero = quantizer.calc_qparams(W)
        params[0] = (scale.view(-1), zero.view(-1))
    elif static_groups:
        for g in range(n_groups):
            scale, zero = slice_quantizer.calc_qparams(W[:, g * gs : (g + 1) * gs])
            params[g] = (scale.view(-1), zero.view(-1))

    perm = torch.argsort(torch.diag(H), descending=True) if actorder else torch.arange(cols, device=W.device)
    if actorder:
        W, H = W[:, perm], H[perm][:, perm]
        pruned = pruned[:, perm] if pruned is not None else None
    # Group of each column in processing order; only dynamic groups under actorder follow that order.
    dynamic = grouped and not static_groups
    if dynamic:
        col_group = torch.arange(cols, device=W.device) // gs
        # One group per block: its params then come from weights updated by every earlier group.
        blocksize = gs
    else:
        col_group = natural_g_idx(cols, quantizer, W.device)[perm]

    groups_in_order = col_group.tolist()

    Hinv = inverse_hessian_cholesky(H, percdamp)
    del H
    Q = torch.zeros_like(W)
    if not dynamic:
        all_scale = torch.stack([p[0] for p in params], dim=1)  # [rows, n_groups]
        all_zero = torch.stack([p[1] for p in params], dim=1)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        if dynamic:
            scale, zero = slice_quantizer.calc_qparams(W1)
            params[i1 // gs] = (scale.view(-1), zero.view(-1))
            S1, Z1 = scale.view(-1, 1), zero.view(-1, 1)
        elif grouped and (actorder or groups_in_order[i1] != groups_in_order[i2 - 1]):
            block_groups = col_group[i1:i2]
            S1, Z1 = all_scale[:, block_groups], all_zero[:, block_groups]
        elif grouped:
            g = groups_in_order[i1]
            S1, Z1 = all_scale[:, g : g + 1], all_zero[:, g : g + 1]
        else:
            S1, Z1 = all_scale, all_zero
        Hinv1 = Hinv[i1:i2, i1:i2]
        prune1 = pruned[:, i1:i2] if pruned is not None else None
        Q1, Err1 = quantize_block(W1, Hinv1, S1, Z1, quantizer.qmin, quantizer.qmax, prune1)
        Q[:, i1:i2] = Q1
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)

    inv = torch.argsort(perm)
    if actorder:
        Q, col_group = Q[:, inv], col_group[inv]
    scale = torch.stack([p[0] for p in params], dim=1)
    zero = torch.stack([p[1] for p in params], dim=1)
    return GptqResult(Q, scale.reshape(-1, 1), zero.reshape(-1, 1), col_group.long())


def children_targets(ctx: BlockContext) -> dict[str, set[str]]:
    """The block's direct children that hold quantization targets, with the targets each holds."""
    owned: dict[str, set[str]] = {}
    for name in ctx.targets:
        child = name.split(".", 1)[0]
        if child != name:
            owned.setdefault(child, set()).add(name)
    return owned


class GroupIndexFakeQuantLinear(FakeQuantLinear):
    """A fake-quant linear whose per_group params belong to arbitrary column groups `g_idx`
    (GPTQ act-order with dynamic groups), instead of contiguous runs of `group_size` columns."""

    def fake_weight(self) -> Tensor:
        scale = self.w_scale.view(self.out_features, -1)[:, self.g_idx]
        zero = self.w_zero.view(self.out_features, -1)[:, self.g_idx]
        return qdq_elementwise(self.weight.float(), scale, zero, self.weight_quantizer).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", g_idx (act-order groups)"


@register_method
class GPTQ(QuantMethod):
    name = "GPTQ"
    Special = GptqSpecial
    # Measured on SmolLM2-135M W4 per-channel: WikiText-2 PPL 30.08 with, 32.30 without.
    prefers_quant_out = True
    replay_children = True
    """With true_sequential, replay finished children of the block instead of re-running them."""

    @property
    def arbitrary_group_order(self) -> bool:
        sp = self.special
        return self.weight_quantizer.granularity == "per_group" and sp.actorder and not sp.static_groups

    def extra_device_bytes(self, model: nn.Module, adapter: ModelAdapter, calib_tokens: int) -> int:
        """float32 Hessians held at once, plus GPTQ's working set for the largest group or, during
        the true-sequential passes, the replayed outputs of a finished child (one hidden state per token)."""
        held = work = 0
        for block in adapter.get_blocks(model):
            sizes = []
            for group in adapter.block_groups(block):
                linears = [block.get_submodule(n) for n in group.linears]
                sizes.append((linears[0].in_features, sum(m.out_features for m in linears)))
            hessians = [4 * i * i for i, _ in sizes]
            held = max(held, max(hessians) if self.special.true_sequential else sum(hessians))
            # Beside the held H (damped in place): its Cholesky factor and the inverse, plus a copy of H
            # when it is permuted (actorder) or shared by separate solves (per_tensor); four [rows, in].
            copies = 3 if self.special.actorder or self.weight_quantizer.granularity == "per_tensor" else 2
            work = max(work, max(4 * (copies * i * i + 4 * i * r) for i, r in sizes))
        replayed = 0
        if self.special.true_sequential and self.replay_children:
            replayed = calib_tokens * model.get_input_embeddings().embedding_dim * next(model.parameters()).element_size()
        return held + max(work, replayed)

    def process_block(self, ctx: BlockContext) -> None:
        groups = [list(mods.items()) for _, mods in ctx.groups()]
        results: list[tuple[str, GptqResult]] = []
        if self.special.true_sequential:
            # A child of the block whose linears are all quantized, and which ran to completion in a
            # pass, gives the same output in every later pass: record it once, replay it after.
            frozen: dict[str, list] = {}
            done: set[str] = set()
            owned = children_targets(ctx) if self.replay_children and ctx.inputs_on_device() else {}
            for k, group in enumerate(groups):
                last = k == len(groups) - 1
                ready = [c for c, names in owned.items() if c not in frozen and names <= done] if not last else []
                with timed(self.stage_seconds, "hessian", ctx.device):
                    (hessian,), recorded = group_hessians(ctx, [group], replay=frozen, record=ready)
                frozen.update(recorded)
                if last:
                    frozen.clear()
                with timed(self.stage_seconds, "solve", ctx.device):
                    results += self.quantize_group(ctx, group, hessian)
                done.update(name for name, _ in group)
        else:
            with timed(self.stage_seconds, "hessian", ctx.device):
                hessians, _ = group_hessians(ctx, groups)
            with timed(self.stage_seconds, "solve", ctx.device):
                for group, hessian in zip(groups, hessians):
                    results += self.quantize_group(ctx, group, hessian)
        # Wrapping only now keeps the Hessian forwards free of (not yet calibrated) static
        # activation quantization; later groups already saw Q, the weights were written in place.
        if self.final:
            for name, result in results:
                self.wrap(ctx, name, result)

    def quantize_group(
        self, ctx: BlockContext, group: list[tuple[str, nn.Module]], hessian: Tensor
    ) -> list[tuple[str, GptqResult]]:
        """GPTQ the group's linears and write Q into their float weights (which the results then hold)."""
        sp, wq = self.special, self.weight_quantizer
        # Rows are independent given H, so linears sharing it run as one stacked weight,
        # except per_tensor where each linear needs its own single range.
        parts = [[item] for item in group] if wq.granularity == "per_tensor" else [group]
        out = []
        for part in parts:
            weight = torch.cat([m.weight for _, m in part])
            try:
                res = gptq_quantize(weight, hessian, wq.for_dtype(weight.dtype), sp.blocksize, sp.percdamp,
                                    sp.actorder, sp.static_groups, consume_hessian=len(parts) == 1,
                                    keep_zeros=any(is_pruned(m) for _, m in part))
            except NumericsError as exc:
                names = ", ".join(n for n, _ in part)
                raise NumericsError(f"GPTQ on block {ctx.index} ({names}): {exc}") from None
            per_row = res.scale.shape[0] // weight.shape[0]
            start = 0
            for name, module in part:
                stop = start + module.weight.shape[0]
                with torch.no_grad():
                    module.weight.copy_(res.weight[start:stop].to(module.weight.dtype))
                span = slice(start * per_row, stop * per_row)
                out.append((name, GptqResult(module.weight, res.scale[span], res.zero[span], res.g_idx)))
                start = stop
        return out

    def wrap(self, ctx: BlockContext, name: str, result: GptqResult) -> None:
        in_features = result.weight.shape[1]
        natural = natural_g_idx(in_features, self.weight_quantizer, result.g_idx.device)
        if torch.equal(result.g_idx, natural):
            fq = self.wrap_linear(ctx, name)
        else:
            fq = GroupIndexFakeQuantLinear.wrap(
                ctx.block, name, self.weight_quantizer, self.act_quantizer,
                act_static=self.quant.act is not None and self.quant.act.static,
            )
        fq.set_weight_qparams(result.scale, result.zero)
        fq.register_buffer("g_idx", result.g_idx.to(fq.weight.device), persistent=False)
