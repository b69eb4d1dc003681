"""FP8 (e4m3) fake quantization: the quantizer, its config keys, and RTN with FP8 weights and activations."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from llmc import compress, load_config
from llmc.errors import ConfigError
from llmc.quant import FP8Quantizer, fake_quant_modules, quant_disabled


def test_absmax_maps_to_448_and_values_lie_on_the_e4m3_grid():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    q = FP8Quantizer(granularity="per_channel")
    scale, zero = q.calc_qparams(w)
    assert scale.shape == (16, 1) and torch.equal(zero, torch.zeros_like(zero))
    torch.testing.assert_close(scale[:, 0], w.abs().amax(dim=1) / 448)
    codes = q.quantize(w, scale, zero)
    assert codes.dtype == torch.float8_e4m3fn
    assert torch.equal(codes.float().abs().amax(dim=1), torch.full((16,), 448.0))
    out = q.quant_dequant(w, scale, zero)
    assert torch.equal(out, codes.float() * scale)
    assert 0 < (out - w).abs().max() <= w.abs().max() / 16  # 3 mantissa bits: relative error <= 2^-4


def test_per_tensor_and_per_token_and_mse():
    torch.manual_seed(1)
    x = torch.randn(2, 5, 32) * 3
    per_token = FP8Quantizer(granularity="per_token")
    assert per_token.calc_qparams(x)[0].shape == (10, 1)
    per_tensor = FP8Quantizer(granularity="per_tensor")
    assert per_tensor.calc_qparams(x)[0].shape == (1, 1)
    assert per_tensor.fake_quant(x).shape == x.shape and per_tensor.fake_quant(x).dtype == x.dtype
    w = torch.randn(8, 64)
    err = {algo: (FP8Quantizer("per_channel", calib_algo=algo).fake_quant(w) - w).pow(2).sum()
           for algo in ("minmax", "mse")}
    assert err["mse"] <= err["minmax"]


def test_straight_through_gradient():
    x = torch.randn(4, 8, requires_grad=True)
    FP8Quantizer("per_token").fake_quant(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def _cfg(model_dir, weight, act=None, method="RTN"):
    quant = {"method": method, "weight": weight}
    if act is not None:
        quant["act"] = act
    cfg = tiny_config(model_dir, quant=quant)
    del cfg["eval"]
    return cfg


FP8_W = {"quant_type": "float-quant", "bit": "e4m3", "granularity": "per_channel"}


def test_config_spelling(tiny_llama_dir):
    cfg = load_config(_cfg(tiny_llama_dir, FP8_W, {"quant_type": "float-quant", "bit": "e4m3"}))
    assert cfg.quant.weight.bit == "e4m3" and cfg.quant.weight.symmetric is True
    assert cfg.quant.act.quant_type == "float-quant" and cfg.quant.act.granularity == "per_token"
    assert load_config(_cfg(tiny_llama_dir, {"bit": "4"})).quant.weight.bit == 4


@pytest.mark.parametrize("weight,words", [
    ({"bit": "e4m3"}, ["quant.weight", "quant_type: float-quant"]),
    ({"quant_type": "float-quant", "granularity": "per_channel"}, ["quant.weight", "bit: e4m3"]),
    ({"quant_type": "float-quant", "bit": "e4m3"}, ["per_channel"]),
    ({**FP8_W, "symmetric": False}, ["symmetric: true"]),
    ({"quant_type": "float-quant", "bit": "e5m2", "granularity": "per_channel"}, ["quant.weight.bit", "e5m2"]),
    ({"quant_type": "fp8"}, ["quant.weight.quant_type", "int-quant"]),
])
def test_bad_float_configs(tiny_llama_dir, weight, words):
    with pytest.raises(ConfigError) as exc:
        load_config(_cfg(tiny_llama_dir, weight))
    msg = str(exc.value)
    assert "\n" not in msg
    for word in words:
        assert word in msg, (word, msg)


def test_gptq_refuses_float_quant(tiny_llama_dir):
    with pytest.raises(ConfigError, match="GPTQ does not support quant_type: float-quant.*RTN"):
        compress(load_config(_cfg(tiny_llama_dir, FP8_W, method="GPTQ")), progress=False)


def test_rtn_fp8_weights_and_acts_change_logits_slightly(tiny_llama_dir):
    act = {"quant_type": "float-quant", "bit": "e4m3"}
    result = compress(load_config(_cfg(tiny_llama_dir, FP8_W, act)), progress=False)
    modules = fake_quant_modules(result.model)
    assert len(modules) == 21 and all(isinstance(m.act_quantizer, FP8Quantizer) for _, m in modules)
    assert "we4m3" in repr(modules[0][1])
    ids = torch.randint(3, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fake = result.model(ids).logits
        with quant_disabled(result.model):
            ref = result.model(ids).logits
    rel = ((fake - ref).norm() / ref.norm()).item()
    print("relative logit change", rel)
    assert 0 < rel < 0.1
