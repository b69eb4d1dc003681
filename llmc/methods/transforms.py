"""Function-preserving transforms shared by the scaling methods (AWQ, SmoothQuant, OS+...).

A per-input-channel scale `s` of a group of linears that share one input is folded into
the op that produces that input: the linears' weight columns are multiplied by `s`, the
producer's output is divided by `s` (a norm's weight and bias, or a linear's output rows).
When the producer is `v_proj` and the consumer `o_proj` under grouped-query attention, one
value head feeds several query heads, so the scale must be the same for all of them
(`tie_gqa_scales`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def transformed_online(linears) -> bool:
    """Whether any of the linears applies an online input transform (QuaRot's Hadamard before down_proj):
    a channel scale of their input does not commute with it, so such a group is never scaled."""
    return any(getattr(m, "input_transform", None) is not None for m in linears)


def producer_channels(prev: nn.Module) -> int:
    if isinstance(prev, nn.Linear):
        return prev.out_features
    weight = getattr(prev, "weight", None)
    if weight is None or weight.dim() != 1:
        raise TypeError(f"cannot fold a scale into {type(prev).__name__}: it has no per-channel weight")
    return weight.numel()


def tie_gqa_scales(scales: Tensor, producer_out: int, head_dim: int) -> Tensor:
    """Average the scales of query heads that share a value head, so they can fold into v_proj."""
    channels = scales.numel()
    if channels == producer_out:
        return scales
    if channels % producer_out or producer_out % head_dim:
        raise ValueError(f"cannot tie {channels} scales to a producer of {producer_out} channels")
    kv_heads, rep = producer_out // head_dim, channels // producer_out
    tied = scales.view(kv_heads, rep, head_dim).mean(dim=1, keepdim=True)
    return tied.expand(kv_heads, rep, head_dim).reshape(channels)


@torch.no_grad()
def fold_scales(prev: nn.Module, linears: list[nn.Linear], scales: Tensor, head_dim: int | None = None) -> None:
    """Scale the linears' input channels by `scales` and the producer's output by `1/scales`.

    Exact in real arithmetic: `linear(prev(x))` is unchanged. Under grouped-query attention
    `scales` must already be tied (see `tie_gqa_scales`).
    """
    scales = scales.detach().float()
    for linear in linears:
        w = linear.weight
        w.copy_((w.float() * scales.to(w.device)[None, :]).to(w.dtype))
    out = producer_channels(prev)
    if out == scales.numel():
        prev_scales = scales
    else:
        if head_dim is None:
            raise ValueError("folding into a narrower producer (grouped-query attention) needs head_dim")
        kv_heads, rep = out // head_dim, scales.numel() // out
        prev_scales = scales.view(kv_heads, rep, head_dim)[:, 0, :].reshape(out)
    prev_scales = prev_scales.to(prev.weight.device)
    if isinstance(prev, nn.Linear):
        prev.weight.copy_((prev.weight.float() / prev_scales[:, None]).to(prev.weight.dtype))
    else:
        prev.weight.copy_((prev.weight.float() / prev_scales).to(prev.weight.dtype))
    bias = getattr(prev, "bias", None)
    if bias is not None:
        bias.copy_((bias.float() / prev_scales).to(bias.dtype))
