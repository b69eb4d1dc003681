"""A linear layer that fake-quantizes its weight and, when configured, its input activations.

The quantized linear of llmc: one per module, with its own scheme (weight and activation
quantizers, so one model may mix bits and formats), a weight clipping that can be learned
(`weight_clip`, OmniQuant's LWC; `freeze_clip` turns it into fixed scales), and input transforms
applied before the activation quantizer (`input_transform`: an online rotation such as QuaRot's
Hadamard before down_proj, whose inverse is already in the weight; `act_clip`: a learned clipping
of the activation ranges). Offline transforms (equivalent scales and shifts, fused rotations,
masks) are folded into `weight` itself before wrapping.

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

from llmc.quant.observers import LearnableClip
from llmc.quant.quantizer import representable_scale
from llmc.quant.registry import Quantizer

PRUNED = "llmc_pruned"
"""Attribute set on a pruned linear (`llmc.methods.sparse_base.mark_pruned`): a later quantization (GPTQ)
keeps its zeros, and the export records the sparsity; a FakeQuantLinear keeps the mark of the linear it wraps."""


class TransformedLinear(nn.Linear):
    """A float linear whose input goes through `input_transform` first (an online rotation whose
    inverse is folded into the weight): what a transformed but unquantized linear becomes."""

    def __init__(self, linear: nn.Linear, input_transform: nn.Module) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight = linear.weight
        self.bias = linear.bias
        if getattr(linear, PRUNED, False):
            setattr(self, PRUNED, True)
        self.input_transform = input_transform

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.input_transform(x), self.weight, self.bias)


def set_input_transform(parent: nn.Module, name: str, transform: nn.Module) -> nn.Module:
    """Give linear `parent.<name>` (plain, transformed or fake-quant) the online input `transform`."""
    owner_name, _, attr = name.rpartition(".")
    owner = parent.get_submodule(owner_name) if owner_name else parent
    module = getattr(owner, attr)
    if isinstance(module, (FakeQuantLinear, TransformedLinear)):
        module.input_transform = transform
        return module
    wrapped = TransformedLinear(module, transform)
    setattr(owner, attr, wrapped)
    return wrapped


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
        self.input_transform: nn.Module | None = getattr(linear, "input_transform", None)
        self.weight_clip: LearnableClip | None = None
        self.act_clip: LearnableClip | None = None
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
        if self.weight_clip is not None:  # trained clipping: the range keeps its gradient
            wq = self.weight_quantizer
            scale, zero = wq.params_from_range(*self.weight_clip(wq.rows(self.weight).float()))
            return wq.quant_dequant(self.weight, scale, zero)
        return self.weight_quantizer.quant_dequant(self.weight, self.w_scale, self.w_zero)

    def learn_clipping(self, init: float = 4.0) -> LearnableClip:
        """Start learned weight clipping (one pair of logits per row that shares a scale)."""
        rows = self.weight_quantizer.rows(self.weight.detach()).shape[0]
        self.weight_clip = LearnableClip(rows, init, device=self.weight.device)
        return self.weight_clip

    @torch.no_grad()
    def freeze_clip(self) -> None:
        """Fix the learned clipping's ranges as this layer's scales and zero points."""
        if self.weight_clip is not None:
            wq = self.weight_quantizer
            self.set_weight_qparams(*wq.params_from_range(*self.weight_clip(wq.rows(self.weight).float())))
            self.weight_clip = None

    def as_linear(self) -> nn.Linear:
        """A float linear that shares this layer's weight and bias (and its online input transform)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        if self.input_transform is not None:
            linear = TransformedLinear(linear, self.input_transform)
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
        if self.act_clip is not None:
            scale, zero = aq.params_from_range(*self.act_clip(aq.rows(x).float()))
            return aq.quant_dequant(x, scale, zero)
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
        if self.input_transform is not None:
            x = self.input_transform(x)
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
        t = f", input {type(self.input_transform).__name__}" if self.input_transform is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {w}{a}{t}"


def fake_quant_modules(model: nn.Module) -> list[tuple[str, FakeQuantLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]


class quant_disabled:
    """Inside this context every fake quantizer of `model` computes in float: the FakeQuantLinears and any
    other module that marks itself `fake_quant_module = True` and honours `enabled` (the KV-cache quantizers)."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = [m for m in model.modules()
                        if isinstance(m, FakeQuantLinear) or getattr(m, "fake_quant_module", False)]

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
