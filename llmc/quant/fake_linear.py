"""A linear layer that fake-quantizes its weight and, when configured, its input activations.

The float weight stays in `weight` (the transformed model), with the weight quantizer's
scale and zero point beside it; the fake-quantized weight is computed on the fly, so
`llmc.quant.quant_disabled` gives the transformed float model back without a second
copy of the weights. Quantization buffers are not persistent: `state_dict()` keeps the
original layer's keys.

Weight scales are rounded to the weight's dtype when it is narrower than float32 (fp16,
bf16; the weight quantizer gets `scale_dtype`, and scales set from outside are rounded too):
real-quantized exports store scales in the model's dtype, and with a representable scale
`(code - zero) * scale` is exact in float32, so the fake-quantized weight equals the
exported checkpoint's dequantized weight bit for bit. Static activation scales are rounded
alike, so the stored `input_scale` is the one llmc used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmc.quant.fp8 import FP8Quantizer
from llmc.quant.quantizer import IntQuantizer, representable_scale

Quantizer = IntQuantizer | FP8Quantizer
PRUNED = "llmc_pruned"
"""Attribute set on a pruned linear (`llmc.methods.sparse_base.mark_pruned`): a later quantization (GPTQ)
keeps its zeros, and the export records the sparsity; a FakeQuantLinear keeps the mark of the linear it wraps."""


class FakeQuantLinear(nn.Module):
    def __init__(
        self,
        linear: nn.Linear,
        weight_quantizer: Quantizer,
        act_quantizer: Quantizer | None = None,
        act_static: bool = False,
    ) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        if getattr(linear, PRUNED, False):
            setattr(self, PRUNED, True)
        self.weight_quantizer = weight_quantizer.for_dtype(linear.weight.dtype)
        self.act_quantizer = act_quantizer
        self.act_static = act_static
        self.enabled = True
        self.observing = False
        self.register_buffer("w_scale", torch.empty(0), persistent=False)
        self.register_buffer("w_zero", torch.empty(0), persistent=False)
        self.register_buffer("a_scale", torch.empty(0), persistent=False)
        self.register_buffer("a_zero", torch.empty(0), persistent=False)
        self._a_min: Tensor | None = None
        self._a_max: Tensor | None = None
        self.reuse_weight = False
        """Quantize the weight once and reuse it while set (see `fake_weights_reused`)."""
        self._reused: Tensor | None = None
        self.calibrate_weight()

    @classmethod
    def wrap(
        cls, parent: nn.Module, name: str, weight_quantizer: Quantizer, act_quantizer: Quantizer | None = None,
        act_static: bool = False,
    ) -> FakeQuantLinear:
        """Replace the linear `parent.<name>` (dotted) by a fake-quant linear and return it."""
        owner_name, _, attr = name.rpartition(".")
        owner = parent.get_submodule(owner_name) if owner_name else parent
        linear = getattr(owner, attr)
        if isinstance(linear, FakeQuantLinear):
            linear = linear.as_linear()
        fq = cls(linear, weight_quantizer, act_quantizer, act_static)
        setattr(owner, attr, fq)
        return fq

    def calibrate_weight(self) -> None:
        """(Re)compute the weight's scale and zero point from the current float weight."""
        scale, zero = self.weight_quantizer.calc_qparams(self.weight)
        self.set_weight_qparams(scale, zero)

    def set_weight_qparams(self, scale: Tensor, zero: Tensor) -> None:
        self.w_scale = representable_scale(scale, self.weight.dtype).to(self.weight.device)
        self.w_zero = zero.to(self.weight.device)

    def fake_weight(self) -> Tensor:
        return self.weight_quantizer.quant_dequant(self.weight, self.w_scale, self.w_zero)

    def as_linear(self) -> nn.Linear:
        """A plain nn.Linear that shares this layer's float weight and bias."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        if getattr(self, PRUNED, False):
            setattr(linear, PRUNED, True)
        return linear

    def quantize_input(self, x: Tensor) -> Tensor:
        aq = self.act_quantizer
        if aq is None:
            return x
        if self.observing:
            flat = x.detach().float()
            lo, hi = flat.amin().reshape(1, 1), flat.amax().reshape(1, 1)
            self._a_min = lo if self._a_min is None else torch.minimum(self._a_min, lo)
            self._a_max = hi if self._a_max is None else torch.maximum(self._a_max, hi)
            return x
        if self.act_static:
            if self.a_scale.numel() == 0:
                raise RuntimeError("static activation range used before calibration")
            return aq.quant_dequant(x, self.a_scale, self.a_zero)
        return aq.fake_quant(x)

    def finish_observing(self) -> None:
        """Freeze the static activation range seen while `observing`."""
        self.observing = False
        if self._a_min is None or self.act_quantizer is None:
            raise RuntimeError("no activations were observed for static activation quantization")
        scale, self.a_zero = self.act_quantizer.params_from_range(self._a_min, self._a_max)
        self.a_scale = representable_scale(scale, self.weight.dtype)
        self._a_min = self._a_max = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return F.linear(x, self.weight, self.bias)
        if not self.reuse_weight:
            return F.linear(self.quantize_input(x), self.fake_weight(), self.bias)
        if self._reused is None:
            self._reused = self.fake_weight()
        return F.linear(self.quantize_input(x), self._reused, self.bias)

    def extra_repr(self) -> str:
        wq, aq = self.weight_quantizer, self.act_quantizer
        w = f"w{wq.bit} {'sym' if wq.symmetric else 'asym'} {wq.granularity}"
        if wq.granularity == "per_group":
            w += f" g{wq.group_size}"
        a = f", a{aq.bit} {aq.granularity}{' static' if self.act_static else ''}" if aq else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {w}{a}"


def fake_quant_modules(model: nn.Module) -> list[tuple[str, FakeQuantLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]


class quant_disabled:
    """Inside this context every FakeQuantLinear of `model` computes in float."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = [m for _, m in fake_quant_modules(model)]

    def __enter__(self) -> None:
        self.saved = [m.enabled for m in self.modules]
        for m in self.modules:
            m.enabled = False

    def __exit__(self, *exc: object) -> None:
        for m, state in zip(self.modules, self.saved):
            m.enabled = state


class fake_weights_reused:
    """Inside this context every FakeQuantLinear of `module` quantizes its weight on its first
    forward and reuses it (for forwards over many batches that leave the weights alone); the
    quantized copies are dropped on exit."""

    def __init__(self, module: nn.Module) -> None:
        self.modules = [m for _, m in fake_quant_modules(module)]

    def __enter__(self) -> None:
        for m in self.modules:
            m.reuse_weight = True

    def __exit__(self, *exc: object) -> None:
        for m in self.modules:
            m.reuse_weight, m._reused = False, None
