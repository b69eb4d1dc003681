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

The indices are a non-persistent buffer, saved and restored by the resume checkpoint like the scales
(`llmc.pipeline.checkpoint`, which re-creates this class by name). These mixed layouts have no
compressed-tensors / AutoAWQ / GPTQ / MLC-LLM format; `export_refusal` refuses them, and the dense
`save_fake` too when activations are quantized (a dense weight cannot carry the float input columns).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

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
