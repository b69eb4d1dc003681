"""Outlier input columns kept in float: the shared layer of LLM.int8(), QUIK and OWQ.

`OutlierColumnLinear` is a FakeQuantLinear whose input columns `outlier_idx` stay in float: the
weight's outlier columns are not quantized, and with activation quantization the input's outlier
features are not quantized either, so the layer computes
    y = x_out @ W_out^T (float) + Q(x_rest) @ Q(W_rest)^T.
The quantized part is computed on the weight (input) with the outlier columns set to zero: every
range includes zero (`IntQuantizer.params_from_range`), so a zeroed column never widens a row's or a
token's range, and the per-row / per-token scales are those of the remaining columns. (With
per_group weights the groups stay the contiguous runs of the original columns; QUIK's reference code
instead moves the outlier columns to the end.)

With `gptq_by_group` (QUIK's and OWQ's `gptq` key, as in both papers) the remaining columns are solved
by GPTQ instead of rounded: GPTQ runs on the sub-matrix W[:, rest] with the Hessian H[rest][:, rest]
(the float columns are exact, so they have no error to spread and drop out of the sweep), and the
layer holds the parameters GPTQ used. Its per_group groups are then those of GPTQ on the sub-matrix,
contiguous runs of the remaining columns (QUIK's layout), held as the `g_idx` buffer of each column.

The indices are a non-persistent buffer, saved and restored by the resume checkpoint like the scales
(`llmc.pipeline.checkpoint`, which re-creates this class by name). These mixed layouts have no
compressed-tensors / AutoAWQ / GPTQ / MLC-LLM format; `export_refusal` refuses them, and the dense
`save_fake` too when activations are quantized (a dense weight cannot carry the float input columns).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pydantic import BaseModel, Field
from torch import Tensor, nn

from llmc.methods.base import QuantMethod
from llmc.methods.gptq import gptq_quantize, qdq_elementwise
from llmc.methods.hessian import group_hessians
from llmc.pipeline.blockwise import BlockContext
from llmc.quant.fake_linear import FakeQuantLinear

REAL_FORMATS = {"save_vllm": "vLLM (compressed-tensors)", "save_sgl": "SGLang (compressed-tensors)",
                "save_autoawq": "AutoAWQ", "save_mlcllm": "MLC-LLM", "save_gptq": "GPTQ"}


class OutlierColumnLinear(FakeQuantLinear):
    """A fake-quant linear whose input columns `outlier_idx` stay in float (weights and activations)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("outlier_idx", torch.empty(0, dtype=torch.long, device=self.weight.device),
                             persistent=False)

    def set_outliers(self, idx: Tensor) -> None:
        """Keep input columns `idx` in float, and recompute the weight's scales without them."""
        idx = torch.as_tensor(idx, dtype=torch.long).flatten().unique().to(self.weight.device)
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.in_features):
            raise ValueError(f"outlier columns out of range for {self.in_features} input features")
        self.outlier_idx = idx
        self.calibrate_weight()

    def column_mask(self) -> Tensor | None:
        idx = getattr(self, "outlier_idx", None)
        if idx is None or idx.numel() == 0:
            return None
        mask = torch.zeros(self.in_features, dtype=torch.bool, device=self.weight.device)
        mask[idx] = True
        return mask

    def calibrate_weight(self) -> None:
        mask = self.column_mask()
        weight = self.weight if mask is None else self.weight.detach().masked_fill(mask, 0)
        self.set_weight_qparams(*self.weight_quantizer.calc_qparams(weight))

    def fake_weight(self) -> Tensor:
        mask = self.column_mask()
        g_idx = getattr(self, "g_idx", None)
        if g_idx is not None and self.weight_clip is None:  # per_group params of GPTQ's column groups
            scale = self.w_scale.view(self.out_features, -1)[:, g_idx]
            zero = self.w_zero.view(self.out_features, -1)[:, g_idx]
            quantized = qdq_elementwise(self.weight.float(), scale, zero, self.weight_quantizer).to(self.weight.dtype)
            return quantized if mask is None else torch.where(mask, self.weight, quantized)
        if mask is None:
            return super().fake_weight()
        wq, weight = self.weight_quantizer, self.weight.masked_fill(mask, 0)
        if self.weight_clip is not None:  # as the parent's, on the weight without its outlier columns
            quantized = wq.quant_dequant(weight, *wq.params_from_range(*self.weight_clip(wq.rows(weight).float())))
        else:
            quantized = wq.quant_dequant(weight, self.w_scale, self.w_zero)
        return torch.where(mask, self.weight, quantized)

    def quantize_input(self, x: Tensor) -> Tensor:
        mask = self.column_mask()
        if mask is None or self.act_quantizer is None:
            return super().quantize_input(x)
        return torch.where(mask, x, super().quantize_input(x.masked_fill(mask, 0)))

    def extra_repr(self) -> str:
        idx = getattr(self, "outlier_idx", None)
        return super().extra_repr() + f", {0 if idx is None else idx.numel()} float columns"


def outlier_export_refusal(method: str, save_flags: list[str], act_quantized: bool) -> str | None:
    """The one-line refusal of the formats a layer with float outlier columns cannot be written as."""
    for flag in save_flags:
        if flag in REAL_FORMATS:
            return (f"{method} keeps outlier input columns in float beside quantized ones, which "
                    f"{REAL_FORMATS[flag]} ({flag}) cannot store; remove save.{flag} (save_trans works)")
        if flag == "save_fake" and act_quantized:
            return (f"{method} keeps the outlier input features unquantized, which a dense fake-quantized "
                    f"weight (save_fake) cannot reproduce with quantized activations; remove save.save_fake "
                    f"or quant.act")
    return None


class OutlierColumnMethod(QuantMethod):
    """What LLM.int8(), QUIK and OWQ share: calibrated, the quantizing method, no packed export format."""

    quantizes_only = True
    needs_calibration = True

    def export_refusal(self, save_flags: list[str]) -> str | None:
        return outlier_export_refusal(self.name, save_flags, self.quant.act is not None)


@torch.no_grad()
def input_stats(ctx: BlockContext, names: list[str]) -> dict[str, tuple[Tensor, Tensor]]:
    """Per named linear (the first of each group, in execution order), over the real calibration tokens
    of one forward of the block: the per-feature max |x| and the mean x^2 (float32)."""
    absmax: dict[str, Tensor] = {}
    sumsq: dict[str, Tensor] = {}
    tokens = dict.fromkeys(names, 0)

    def observe(name: str, rows: Tensor) -> None:
        rows = rows.detach().to(ctx.device, torch.float32)
        cur, sq = rows.abs().amax(dim=0), rows.pow(2).sum(dim=0)
        absmax[name] = cur if name not in absmax else torch.maximum(absmax[name], cur)
        sumsq[name] = sq if name not in sumsq else sumsq[name] + sq
        tokens[name] += rows.shape[0]

    with ctx.hook_inputs(names, observe, only_real_tokens=True):
        ctx.forward_until(names[-1], inclusive=False)
    return {n: (absmax[n], sumsq[n] / tokens[n]) for n in names if tokens[n]}


def wrap_outliers(method, ctx: BlockContext, name: str, idx: Tensor) -> OutlierColumnLinear:
    """Wrap block linear `name` with `method`'s quantizers, keeping input columns `idx` in float."""
    fq = OutlierColumnLinear.wrap(ctx.block, name, method.weight_quantizer, method.act_quantizer,
                                  act_static=method.quant.act is not None and method.quant.act.static)
    fq.set_outliers(idx)
    return fq


Choose = Callable[[Tensor, Tensor, nn.Module], Tensor]
"""`(absmax, meansq, linear)`: from the per-feature max |x| and mean x^2 of a linear's input, the
indices of its columns kept in float."""


def wrap_by_group(method, ctx: BlockContext, choose: Choose) -> dict[str, int]:
    """Wrap every target of the block as an OutlierColumnLinear, with the float columns `choose` picks
    from one calibration forward of the float block; returns the count of float columns per linear."""
    groups = ctx.groups()
    stats = input_stats(ctx, [next(iter(mods)) for _, mods in groups]) if groups else {}
    counts: dict[str, int] = {}
    none = torch.empty(0, dtype=torch.long)
    for _, mods in groups:
        first = next(iter(mods))
        for name, module in mods.items():
            # a group no calibration token reached (an MoE expert never routed to) keeps no float columns
            idx = choose(*stats[first], module) if first in stats else none
            wrap_outliers(method, ctx, name, idx)
            counts[name] = int(idx.numel())
    for name in ctx.targets:
        if name not in counts:
            wrap_outliers(method, ctx, name, none)
    return counts


class OutlierGptqKeys(BaseModel):
    """The `quant.special` keys of GPTQ on the quantized columns (GPTQ's names and defaults)."""

    gptq: bool = Field(True, description="Solve the quantized columns with GPTQ instead of rounding them.")
    percdamp: float = Field(0.01, gt=0, description="GPTQ's damping of diag(H), as a fraction of its mean.")
    blocksize: int = Field(128, ge=1, description="GPTQ's columns per lazy batch update.")
    actorder: bool = Field(False, description="GPTQ's columns in order of decreasing diag(H).")
    static_groups: bool = Field(False, description="GPTQ's per_group params from the weight, up front.")


@torch.no_grad()
def gptq_by_group(method, ctx: BlockContext, choose: Choose, keys: OutlierGptqKeys) -> dict[str, int]:
    """As `wrap_by_group`, with the quantized columns solved by GPTQ. Groups run in execution order
    (GPTQ's true_sequential): each group's Hessian is measured with the earlier groups' weights
    already solved, and its float columns are chosen from the same forward (mean x^2 = diag(H) / 2;
    `choose` gets no absmax). Returns the count of float columns per linear."""
    solved: dict[str, tuple] = {}
    for _, mods in ctx.groups():
        group = list(mods.items())
        (hessian,), _ = group_hessians(ctx, [group])
        n = hessian.shape[0]
        # no calibration token reached the group (an MoE expert never routed to): the identity Hessian
        unreached = bool((hessian.diagonal() == 1).all()) and int(torch.count_nonzero(hessian)) == n
        for name, module in group:
            if unreached:
                idx = torch.empty(0, dtype=torch.long, device=hessian.device)
            else:
                idx = choose(None, hessian.diagonal() / 2, module).to(hessian.device)
            rest = torch.ones(n, dtype=torch.bool, device=hessian.device)
            rest[idx] = False
            wq = method.weight_quantizer.for_dtype(module.weight.dtype)
            res = gptq_quantize(module.weight[:, rest.to(module.weight.device)], hessian[rest][:, rest], wq,
                                keys.blocksize, keys.percdamp, keys.actorder, keys.static_groups)
            g_idx = torch.zeros(n, dtype=torch.long, device=hessian.device)
            g_idx[rest] = res.g_idx.to(hessian.device)
            # Q in place: later groups' Hessians see it, as in GPTQ
            module.weight[:, rest.to(module.weight.device)] = res.weight.to(module.weight)
            solved[name] = (idx, res.scale, res.zero, g_idx if wq.granularity == "per_group" else None)
        del hessian
    counts: dict[str, int] = {}
    for name in ctx.targets:
        idx, scale, zero, g_idx = solved.get(name, (torch.empty(0, dtype=torch.long), None, None, None))
        fq = wrap_outliers(method, ctx, name, idx)
        if scale is not None:
            fq.set_weight_qparams(scale, zero)
        if g_idx is not None:
            fq.register_buffer("g_idx", g_idx.to(fq.weight.device), persistent=False)
        counts[name] = int(idx.numel())
    return counts
