"""Fake quantization of the keys and values attention stores: a module applied to the output of a
key or value projection (`[..., heads * head_dim]`), attached as a forward hook on that linear.

Granularities (the tensor is seen as `[batch, tokens, heads, head_dim]`):
  per_tensor (static): one scale for the whole cache of a layer;
  per_head (static): one scale per (key/value) head;
  per_channel (dynamic; KIVI's keys): one range per channel, over groups of `group_size` tokens
    of one sequence (-1: the whole sequence);
  per_token (dynamic; KIVI's values): one range per token and head, over the head's channels.
Static scales are observed (running absmax / min-max) while `observing` is on, then frozen.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from llmc.quant.registry import Quantizer

STATIC = ("per_tensor", "per_head")


class KVFakeQuant(nn.Module):
    fake_quant_module = True  # switched off by llmc.quant.quant_disabled

    def __init__(self, quantizer: Quantizer, granularity: str, head_dim: int, group_size: int = -1) -> None:
        super().__init__()
        self.quantizer = quantizer  # rows share one range: per_tensor one row, else one per row
        self.granularity = granularity
        self.head_dim = head_dim
        self.group_size = group_size
        self.enabled = True
        self.observing = False
        self.xmin: Tensor | None = None
        self.xmax: Tensor | None = None
        self.scale: Tensor | None = None
        self.zero: Tensor | None = None

    @property
    def static(self) -> bool:
        return self.granularity in STATIC

    def rows(self, x: Tensor) -> tuple[Tensor, callable]:
        """`x` as rows that share one range, and the inverse."""
        shape = x.shape
        if self.granularity == "per_tensor":
            return x.reshape(1, -1), lambda r: r.reshape(shape)
        if self.granularity == "per_token":  # per token of each head, as the cache stores it
            return x.reshape(-1, self.head_dim), lambda r: r.reshape(shape)
        if self.granularity == "per_head":
            heads = shape[-1] // self.head_dim
            h = x.reshape(-1, heads, self.head_dim).transpose(0, 1)  # [heads, tokens, head_dim]
            return h.reshape(heads, -1), lambda r: r.reshape(heads, -1, self.head_dim).transpose(0, 1).reshape(shape)
        # per_channel: [batch, tokens, channels] -> rows of (batch, group, channel) over the group's tokens
        x3 = x.reshape(-1, shape[-2], shape[-1]) if x.dim() >= 2 else x.reshape(1, 1, -1)
        b, t, c = x3.shape
        g = t if self.group_size <= 0 else self.group_size
        pad = -t % g
        if pad:  # repeating the last token leaves each group's min and max unchanged
            x3 = torch.cat([x3, x3[:, -1:].expand(b, pad, c)], dim=1)
        rows = x3.reshape(b, -1, g, c).permute(0, 1, 3, 2).reshape(-1, g)

        def back(r: Tensor) -> Tensor:
            return r.reshape(b, -1, c, g).permute(0, 1, 3, 2).reshape(b, t + pad, c)[:, :t].reshape(shape)

        return rows, back

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        rows, _ = self.rows(x.detach().float())
        lo, hi = rows.amin(dim=1, keepdim=True), rows.amax(dim=1, keepdim=True)
        self.xmin = lo if self.xmin is None else torch.minimum(self.xmin, lo)
        self.xmax = hi if self.xmax is None else torch.maximum(self.xmax, hi)

    def freeze(self) -> None:
        """Static scales from the observed ranges (`absmax / qmax` symmetric, `(max - min) / qmax` asymmetric)."""
        if self.xmin is None:
            raise RuntimeError("KV cache quantizer froze without observing any calibration token")
        self.scale, self.zero = self.quantizer.params_from_range(self.xmin, self.xmax)
        self.observing = False

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        if self.observing:
            self.observe(x)
            return x
        rows, back = self.rows(x.float())
        if self.static:
            scale, zero = self.scale.to(x.device), self.zero.to(x.device)
        else:
            scale, zero = self.quantizer.params_from_range(rows.amin(dim=1, keepdim=True),
                                                           rows.amax(dim=1, keepdim=True))
        return back(self.quantizer._qdq_rows(rows, scale, zero)).to(x.dtype)

    def extra_repr(self) -> str:
        q = self.quantizer
        return f"{type(q).__name__}(bit={q.bit}, symmetric={q.symmetric}), {self.granularity}, head_dim={self.head_dim}"


def _hook(module: nn.Module, args, output: Tensor) -> Tensor:
    return module.kv_quant(output)


def attach(linear: nn.Module, kv: KVFakeQuant) -> KVFakeQuant:
    """Fake-quantize `linear`'s output with `kv` from now on (a forward hook reading `linear.kv_quant`)."""
    linear.kv_quant = kv
    linear.register_forward_hook(_hook)
    return kv


def kv_modules(model: nn.Module) -> list[KVFakeQuant]:
    return [m for m in model.modules() if isinstance(m, KVFakeQuant)]
