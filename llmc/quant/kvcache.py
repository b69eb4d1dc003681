"""Fake quantization of the keys and values attention stores: a module applied to the output of a
key or value projection (`[..., heads * head_dim]`), or to what the attention hands its cache.

Granularities (the tensor is seen as `[batch, tokens, heads, head_dim]`):
  per_tensor (static): one scale for the whole cache of a layer;
  per_head (static): one scale per (key/value) head;
  per_channel (dynamic; KIVI's keys): one range per channel, over groups of `group_size` tokens
    of one sequence (-1: the whole sequence);
  per_token (dynamic; KIVI's values): one range per token and head, over the head's channels.
Static scales are observed (running absmax / min-max) while `observing` is on, then frozen.

Two places to apply them: `attach` hooks the key or value projection's output (keys before RoPE);
`attach_cache` hooks the attention's cache argument (`CacheQuant`): the attention is handed a
stand-in whose `update(keys, values, ...)` fake-quantizes the post-RoPE keys and the values, then
passes them on to the real cache (or returns them, when there is none). That is the point
transformers' attention modules hand their keys to the cache after RoPE, and what vLLM's FP8
cache and llm-compressor's calibration see, with no change to the attention code or its
implementation (`eager`, `sdpa`, ...).
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from llmc.errors import ModelError
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


CACHE_ARGS = ("cache", "past_key_values", "past_key_value")
"""Names transformers' attention modules have given their cache argument (newest first)."""


def _by_head(kv: KVFakeQuant, x: Tensor) -> Tensor:
    """`kv` on cache-layout states `[batch, heads, tokens, head_dim]`, seen in the projection's
    layout `[batch, tokens, heads * head_dim]` that KVFakeQuant's granularities are written for."""
    if not kv.enabled:
        return x
    b, h, t, d = x.shape
    y = kv(x.transpose(1, 2).reshape(b, t, h * d))
    return y.reshape(b, t, h, d).transpose(1, 2)


class CacheQuant(nn.Module):
    """The key and value quantizers of one attention module, applied where it updates its cache."""

    def __init__(self, key: KVFakeQuant, value: KVFakeQuant, arg: str, position: int) -> None:
        super().__init__()
        self.key, self.value = key, value
        self.arg, self.position = arg, position  # the forward's cache parameter, by name and position


class _QuantizingCache:
    """Stands in for an attention module's cache argument for one call."""

    def __init__(self, quant: CacheQuant, inner: object | None) -> None:
        self.quant, self.inner = quant, inner

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        k, v = _by_head(self.quant.key, key_states), _by_head(self.quant.value, value_states)
        if self.inner is None:
            return k, v
        return self.inner.update(k, v, *args, **kwargs)

    def __getattr__(self, name: str):  # anything else the attention reads is the real cache's
        if self.inner is None:
            raise AttributeError(name)
        return getattr(self.inner, name)


def _cache_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    quant: CacheQuant = module.kv_cache_quant
    if len(args) > quant.position:  # passed positionally
        args = (*args[: quant.position], _QuantizingCache(quant, args[quant.position]), *args[quant.position + 1:])
        return args, kwargs
    inner = None
    for name in CACHE_ARGS:  # an older name too, which a deprecation shim would rename
        found = kwargs.pop(name, None)
        inner = found if found is not None else inner
    kwargs[quant.arg] = _QuantizingCache(quant, inner)
    return args, kwargs


def attach_cache(attn: nn.Module, key: KVFakeQuant, value: KVFakeQuant) -> CacheQuant:
    """Fake-quantize the keys (after RoPE) and values `attn` hands its cache, from now on."""
    params = list(inspect.signature(attn.forward).parameters)
    arg = next((a for a in CACHE_ARGS if a in params), None)
    if arg is None:
        raise ModelError(f"{type(attn).__name__}.forward takes no cache argument ({', '.join(CACHE_ARGS)}), "
                         "so keys cannot be quantized after RoPE; set quant.kvcache.post_rope: false")
    attn.kv_cache_quant = quant = CacheQuant(key, value, arg, params.index(arg))
    attn.register_forward_pre_hook(_cache_hook, with_kwargs=True)
    return quant


def cache_quants(model: nn.Module) -> list[tuple[str, CacheQuant]]:
    """`(attention module name, CacheQuant)` of every attention quantized at its cache."""
    return [(name.rsplit(".", 1)[0], m) for name, m in model.named_modules() if isinstance(m, CacheQuant)]
