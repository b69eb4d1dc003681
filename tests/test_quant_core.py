"""The quantization core: observers in one place, the quantizer registry, the quantized linear's
learned clipping and input transforms, and which method of a composition quantizes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmc.config.schema import ActQuantSection, QuantSection, WeightQuantSection
from llmc.errors import ConfigError
from llmc.methods.base import get_methods, quantizing_index
from llmc.quant.fake_linear import FakeQuantLinear, TransformedLinear, quant_disabled, set_input_transform
from llmc.quant.fp8 import FP8Quantizer
from llmc.quant.observers import LearnableClip, observe_range
from llmc.quant.quantizer import IntQuantizer
from llmc.quant.registry import QUANTIZERS, build_quantizer


def weight(seed: int = 0, rows: int = 8, cols: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[:, 3] *= 20  # an outlier column: clipping matters
    return w


def test_registry_builds_each_quant_type_from_config_sections():
    assert {"int-quant", "float-quant"} <= set(QUANTIZERS)
    wq = build_quantizer(WeightQuantSection(bit=3, granularity="per_group", group_size=32, calib_algo="mse"))
    assert isinstance(wq, IntQuantizer) and (wq.bit, wq.group_size, wq.calib_algo) == (3, 32, "mse")
    aq = build_quantizer(ActQuantSection(quant_type="float-quant", bit="e4m3", granularity="per_token"), "act")
    assert isinstance(aq, FP8Quantizer) and aq.granularity == "per_token"
    assert build_quantizer(ActQuantSection(bit=4), "act").group_size == -1


def test_percentile_range_clips_outliers_and_never_widens_minmax():
    rows = weight().reshape(1, -1)
    lo, hi = observe_range(rows, "percentile", 99.0)
    mn, mx = observe_range(rows, "minmax")
    assert mn <= lo < hi <= mx
    assert hi < mx * 0.9  # the outlier column is clipped
    assert torch.equal(torch.stack(observe_range(rows, "percentile", 100.0)), torch.stack((mn, mx)))


@pytest.mark.parametrize("quantizer", [
    IntQuantizer(bit=4, symmetric=False, granularity="per_channel", calib_algo="mse"),
    FP8Quantizer(granularity="per_channel", calib_algo="mse"),
])
def test_mse_search_is_shared_and_never_worse_than_minmax(quantizer):
    import dataclasses

    w = weight(1)
    minmax = dataclasses.replace(quantizer, calib_algo="minmax")
    err = (quantizer.fake_quant(w) - w).pow(2).sum(dim=1)
    err_mm = (minmax.fake_quant(w) - w).pow(2).sum(dim=1)
    assert torch.all(err <= err_mm + 1e-6) and err.sum() < err_mm.sum()


def test_learnable_clip_gets_gradients_through_rounding_and_freezes_to_the_same_weight():
    torch.manual_seed(0)
    linear = nn.Linear(64, 8, bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight(2))
    fq = FakeQuantLinear(linear, IntQuantizer(bit=3, symmetric=False, granularity="per_group", group_size=16))
    rtn = fq.fake_weight().detach().clone()
    clip = fq.learn_clipping()
    assert torch.allclose(clip.upper, torch.full_like(clip.upper, 4.0))
    opt = torch.optim.Adam(clip.parameters(), lr=0.01)
    x = torch.randn(256, 64)
    target = x @ linear.weight.detach().T
    first = None
    for _ in range(80):
        loss = (fq(x) - target).pow(2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert clip.upper.grad is not None and linear.weight.grad is not None
    trained = fq.fake_weight().detach().clone()
    assert loss.item() < first
    assert not torch.equal(trained, rtn)
    fq.freeze_clip()
    assert fq.weight_clip is None
    assert torch.equal(fq.fake_weight(), trained)


def test_act_clip_clips_each_tokens_range_by_one_learned_ratio():
    fq = FakeQuantLinear(nn.Linear(16, 4), IntQuantizer(bit=8, symmetric=True, granularity="per_channel"),
                         IntQuantizer(bit=4, symmetric=True, granularity="per_token"))
    fq.act_clip = LearnableClip(1, init=0.0)  # sigmoid(0) = 0.5 of each token's range
    x = torch.randn(5, 16)
    q = fq.quantize_input(x)
    # symmetric 4-bit: codes -8..7, so the clipped range reaches 8/7 of half the token's absmax
    assert torch.all(q.abs().amax(dim=1) <= x.abs().amax(dim=1) * 0.5 * 8 / 7 + 1e-6)
    fq.act_clip = None
    assert torch.allclose(fq.quantize_input(x).abs().amax(dim=1), x.abs().amax(dim=1))


class Negate(nn.Module):
    def forward(self, x):
        return -x


def test_input_transform_survives_wrapping_unwrapping_and_quant_disabled():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(8, 8))
    x = torch.randn(3, 8)
    want = block(-x)
    wrapped = set_input_transform(block, "0", Negate())
    assert isinstance(wrapped, TransformedLinear) and torch.allclose(block(x), want)
    assert set(block.state_dict()) == {"0.weight", "0.bias"}
    fq = FakeQuantLinear.wrap(block, "0", IntQuantizer(bit=8, symmetric=True, granularity="per_channel"))
    assert isinstance(fq.input_transform, Negate)
    with quant_disabled(block):
        assert torch.allclose(block(x), want)
    assert torch.allclose(block(x), want, atol=0.05)
    assert isinstance(fq.as_linear(), TransformedLinear)
    assert "input Negate" in repr(fq)


def quant(method, **special) -> QuantSection:
    return QuantSection(method=method, special=special)


def test_a_tuner_comes_after_the_quantizing_method():
    from llmc.methods.base import QuantMethod

    class Plain(QuantMethod):
        name = "Plain"

    class Tuner(QuantMethod):
        name = "Tuner"
        tunes_quantized = True

    assert quantizing_index([Plain, Tuner]) == 0
    assert quantizing_index([Plain, Plain, Tuner, Tuner]) == 1
    assert quantizing_index([Tuner]) == 0
    with pytest.raises(ConfigError, match="must come after Plain"):
        quantizing_index([Tuner, Plain])


def test_learnable_clipping_needs_a_method_that_trains_it():
    cfg = QuantSection(method="GPTQ", weight=WeightQuantSection(calib_algo="learnable"))
    with pytest.raises(ConfigError, match="learnable needs a method that trains the clipping"):
        get_methods(cfg)
    methods = get_methods(QuantSection(method=["AWQ", "GPTQ"]))
    assert [m.final for m in methods] == [False, True]


def test_half_range_symmetric_scale_matches_compressed_tensors_and_lowers_4bit_error():
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.utils import calculate_qparams

    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(3))
    half = IntQuantizer(bit=4, symmetric=True, granularity="per_channel", sym_scale="half_range")
    qmax = IntQuantizer(bit=4, symmetric=True, granularity="per_channel")
    scale, zero = half.calc_qparams(w)
    args = QuantizationArgs(num_bits=4, symmetric=True, strategy="channel")
    ct_scale, _ = calculate_qparams(w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True), args)
    torch.testing.assert_close(scale, ct_scale.float(), rtol=1e-6, atol=0)
    codes = half.quantize(w, scale, zero)
    assert codes.min() >= -8 and codes.max() <= 7 and (codes == -8).any()
    assert torch.allclose(scale, qmax.calc_qparams(w)[0] * 7 / 7.5)
    assert (half.fake_quant(w) - w).pow(2).sum() < (qmax.fake_quant(w) - w).pow(2).sum()
    with pytest.raises(ValueError, match="half_range applies to symmetric int-quant"):
        WeightQuantSection(symmetric=False, sym_scale="half_range")
    assert build_quantizer(ActQuantSection(bit=4, sym_scale="half_range"), "act").sym_scale == "half_range"
