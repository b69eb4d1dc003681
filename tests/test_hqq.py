"""HQQ (llmc/methods/hqq.py): data-free, lower weight error than RTN, float zero points refused by the
integer formats, exportable bit-equal with round_zero, one-line errors for bad keys."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_model, tiny_config
from export_checks import autoawq_packing_utils, fp16_reference, read_tensors

from llmc import compress, load_config
from llmc.config.schema import QuantSection
from llmc.errors import ConfigError
from llmc.export import quantized_linears
from llmc.methods.base import get_methods
from llmc.methods.hqq import HQQQuantizer, HQQSpecial, fit_zero, hqq_params, lp_error, shrink_lp
from llmc.quant import fake_quant_modules
from llmc.quant.quantizer import IntQuantizer
from llmc.schedule import build_methods


def hqq_w4(**special) -> dict:
    """A fresh quant section: HQQ, 4-bit weights in groups of 32, with `special`."""
    return {"method": "HQQ", "weight": {"bit": 4, "group_size": 32}, "special": special}


INTEGER_FORMATS = ["save_vllm", "save_sgl", "save_autoawq", "save_mlcllm", "save_gptq"]


def one_line(exc) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg
    return msg


def quantizer(bit: int, axis: int = 1, float_zero: bool = True) -> HQQQuantizer:
    return HQQQuantizer(bit=bit, symmetric=False, granularity="per_group", group_size=64, axis=axis,
                        float_zero=float_zero)


def heavy_tailed() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    normal = torch.randn(256, 512, generator=gen)
    chi2 = torch.randn(3, 256, 512, generator=gen).pow(2).sum(0)
    return normal / (chi2 / 3).sqrt() * 0.02  # Student-t with 3 degrees of freedom


def tiny_weights() -> list[torch.Tensor]:
    model = build_tiny_model("llama", 384)
    return [m.weight.detach() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]


def errors(weights: list[torch.Tensor], approx: list[torch.Tensor]) -> tuple[float, float]:
    lp = sum((w - a).abs().pow(0.7).sum().item() for w, a in zip(weights, approx))
    mse = sum((w - a).pow(2).sum().item() for w, a in zip(weights, approx))
    return lp, mse


# ---------------------------------------------------------------- the solver


def test_shrink_lp_is_a_shrinkage():
    x = torch.linspace(-2, 2, 401)
    soft = shrink_lp(x, 4.0, 1.0)
    assert torch.equal(soft, torch.sign(x) * torch.relu(x.abs() - 0.25))  # p = 1: soft thresholding
    out = shrink_lp(x, 10.0, 0.7)
    assert torch.all(out.abs() <= x.abs()) and torch.all(out * x >= 0) and torch.isfinite(out).all()
    assert out[200] == 0 and out[0] < -1.9  # zero stays zero; large values are barely shrunk (p < 1)


@pytest.mark.parametrize("source", ["tiny_model", "heavy_tailed"])
@pytest.mark.parametrize("bit", [4, 3])
def test_weight_error_beats_rtn(source, bit):
    weights = tiny_weights() if source == "tiny_model" else [heavy_tailed()]
    rtn = [quantizer(bit, float_zero=False).fake_quant(w) for w in weights]
    q = quantizer(bit)
    hqq = [q.quant_dequant(w, *hqq_params(w, q, HQQSpecial())) for w in weights]
    (rtn_lp, rtn_mse), (hqq_lp, hqq_mse) = errors(weights, rtn), errors(weights, hqq)
    assert hqq_lp < 0.97 * rtn_lp  # measured 0.94-0.95
    assert hqq_mse < 0.93 * rtn_mse  # measured 0.89-0.91
    for w in weights:  # per group, never above min/max rounding in the objective
        rows = q.rows(w)
        scale, zero = hqq_params(w, q, HQQSpecial())
        start = quantizer(bit, float_zero=False).calc_qparams(w)
        assert torch.all(lp_error(rows, q._qdq_rows(rows, scale, zero), 0.7)
                         <= lp_error(rows, q._qdq_rows(rows, *start), 0.7))


def test_zero_fit_lowers_the_objective_and_early_stop_keeps_the_best():
    w = heavy_tailed()
    q = quantizer(4)
    rows = q.rows(w)
    lo, hi = rows.amin(1, keepdim=True), rows.amax(1, keepdim=True)
    scale = (hi - lo) / q.qmax
    start = -lo / scale
    mean_abs = lambda z: (rows - q._qdq_rows(rows, scale, z)).abs().mean().item()  # noqa: E731
    for early in (True, False):
        zero = fit_zero(rows, scale, start, q, HQQSpecial(early_stop=early))
        assert not torch.equal(zero, start)
        assert lp_error(rows, q._qdq_rows(rows, scale, zero), 0.7).sum() < lp_error(
            rows, q._qdq_rows(rows, scale, start), 0.7).sum()
    # The early-stopped zero is the last of the unstopped run's zeros while their mean |error| kept falling.
    zeros = [start] + [fit_zero(rows, scale, start, q, HQQSpecial(early_stop=False, iters=n)) for n in range(1, 21)]
    err = [mean_abs(z) for z in zeros]
    k = next((i for i in range(20) if err[i + 1] >= err[i]), 20)
    assert 0 < k < 20  # it stops early on this matrix
    assert torch.equal(fit_zero(rows, scale, start, q, HQQSpecial()), zeros[k])


def test_optimize_scale_and_round_zero():
    w = heavy_tailed()
    q = quantizer(3)
    rtn_lp, _ = errors([w], [quantizer(3, float_zero=False).fake_quant(w)])
    plain_lp, _ = errors([w], [q.quant_dequant(w, *hqq_params(w, q, HQQSpecial()))])
    scaled = hqq_params(w, q, HQQSpecial(optimize_scale=True))
    assert errors([w], [q.quant_dequant(w, *scaled)])[0] < plain_lp
    ratio = scaled[0] / quantizer(3, float_zero=False).calc_qparams(w)[0]
    assert ratio.min() >= 0.95 - 1e-6 and ratio.max() <= 1.05 + 1e-6
    rq = quantizer(3, float_zero=False)
    for sp in (HQQSpecial(round_zero=True), HQQSpecial(round_zero=True, optimize_scale=True)):
        scale, zero = hqq_params(w, rq, sp)
        assert torch.equal(zero, zero.round()) and zero.min() >= 0 and zero.max() <= 7
        assert errors([w], [rq.quant_dequant(w, scale, zero)])[0] <= rtn_lp


def test_axis0_groups_output_rows():
    w = heavy_tailed()[:128, :192]
    q = quantizer(4, axis=0)
    rows = q.rows(w)
    assert rows.shape == (192 * 128 // 64, 64) and torch.equal(rows[0], w[:64, 0])
    assert torch.equal(q.unrows(rows, w.shape), w)
    scale, zero = hqq_params(w, q, HQQSpecial(axis=0))
    codes = q.quantize(w, scale, zero)
    assert torch.equal(q.quant_dequant(w, scale, zero), q.unrows((q.rows(codes).float() - zero) * scale, w.shape))
    rtn = quantizer(4, axis=0, float_zero=False).fake_quant(w)
    assert errors([w], [q.quant_dequant(w, scale, zero)])[0] < errors([w], [rtn])[0]


# ---------------------------------------------------------------- runs


def test_full_run_reads_no_calibration_data(tiny_llama_dir, tmp_path, monkeypatch):
    import llmc.runner

    def forbidden(*_a, **_k):
        raise AssertionError("HQQ read calibration data")

    for name in ("load_named_documents", "build_calibration"):
        monkeypatch.setattr(llmc.runner, name, forbidden)
    out = tmp_path / "out"
    cfg = tiny_config(tiny_llama_dir, quant=hqq_w4(iters=20),
                      save={"save_fake": True, "save_path": str(out)})
    result = compress(load_config(cfg), progress=False)
    assert result.ppl("fake_quant") > 0 and result.ppl("pretrain") > 0
    modules = fake_quant_modules(result.model)
    assert len(modules) == 3 * 7
    for _name, fq in modules:
        q = fq.weight_quantizer
        assert isinstance(q, HQQQuantizer) and q.float_zero
        assert not torch.equal(fq.w_zero, fq.w_zero.round())  # float zero points
        with torch.no_grad():
            scale, zero = hqq_params(fq.weight, q, HQQSpecial())
            assert torch.equal(fq.w_zero, zero) and torch.equal(fq.w_scale, scale)
            codes = q.quantize(fq.weight, scale, zero)
            assert codes.min() >= 0 and codes.max() <= 15
            assert torch.equal(fq.fake_weight(), q.unrows((q.rows(codes).float() - zero) * scale, fq.weight.shape))
    # save_fake holds the fake-quantized weights: the saved model gives the in-memory logits.
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    saved = AutoModelForCausalLM.from_pretrained(out / "fake_quant_model", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(saved(ids).logits, result.model(ids).logits, atol=1e-5)


def test_round_zero_exports_decompress_bit_equal(tiny_llama_dir, tmp_path):
    pytest.importorskip("compressed_tensors")
    from test_export_ct import assert_bit_equal

    out = tmp_path / "out"
    quant = hqq_w4(round_zero=True, optimize_scale=True)
    cfg = tiny_config(tiny_llama_dir, quant=quant, save={"save_vllm": True, "save_autoawq": True,
                                                         "save_gptq": True, "save_path": str(out)})
    del cfg["eval"]
    result = compress(load_config(cfg), progress=False)
    layers = quantized_linears(result.model)
    for layer in layers:
        assert type(layer.quantizer) is IntQuantizer and torch.equal(layer.zero, layer.zero.round())
        assert torch.equal(layer.dequantized(), layer.module.fake_weight().detach())
    assert_bit_equal(result, out / "vllm_quant_model")  # compressed-tensors' own decompression
    awq, gptq = read_tensors(out / "autoawq_quant_model"), read_tensors(out / "gptq_quant_model")
    assert json.loads((out / "gptq_quant_model" / "config.json").read_text())["quantization_config"]["bits"] == 4
    pu = autoawq_packing_utils()
    shifts = torch.arange(8, dtype=torch.int32) * 4
    unpack = lambda t: ((t.unsqueeze(-1) >> shifts) & 15)  # noqa: E731  (8 4-bit fields per int32, low first)
    for layer in layers:
        ref = fp16_reference(layer)
        t = {k: awq[f"{layer.name}.{k}"] for k in ("qweight", "qzeros", "scales")}
        assert torch.equal(pu.dequantize_gemm(t["qweight"], t["qzeros"], t["scales"].float(), 4, 32).T, ref)
        t = {k: gptq[f"{layer.name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
        codes = unpack(t["qweight"].T).reshape(layer.codes.shape).float()  # [out, in]
        zeros = unpack(t["qzeros"]).reshape(t["qzeros"].shape[0], -1).T.float()  # [out, G]
        g = t["g_idx"].long()
        assert torch.equal((codes - zeros[:, g]) * t["scales"].float().T[:, g], ref)


@pytest.mark.parametrize("flag", INTEGER_FORMATS)
def test_float_zero_exports_refused_before_loading(tiny_llama_dir, tmp_path, monkeypatch, flag):
    import llmc.runner

    monkeypatch.setattr(llmc.runner, "load_model", lambda *_a, **_k: pytest.fail("the model was loaded"))
    cfg = tiny_config(tiny_llama_dir, quant=hqq_w4(), save={flag: True, "save_path": str(tmp_path / "o")})
    with pytest.raises(ConfigError) as exc:
        compress(load_config(cfg), progress=False)
    msg = one_line(exc)
    assert msg.startswith("HQQ's zero points are floats") and f"({flag})" in msg and "round_zero: true" in msg
    cfg["quant"]["special"] = {"axis": 0, "round_zero": True}
    with pytest.raises(ConfigError, match="axis: 0 groups the output rows") as exc:
        compress(load_config(cfg), progress=False)
    one_line(exc)
    assert not (tmp_path / "o").exists()


def test_pruned_weights_need_round_zero(tiny_llama_dir):
    sparse = {"method": "Magnitude", "weight": {"sparsity": 0.5}}
    cfg = tiny_config(tiny_llama_dir, quant=hqq_w4(), sparse=sparse)
    del cfg["eval"]
    with pytest.raises(ConfigError, match="round_zero: true") as exc:
        compress(load_config(cfg), progress=False)
    one_line(exc)
    cfg["quant"]["special"] = {"round_zero": True}
    result = compress(load_config(cfg), progress=False)
    modules = fake_quant_modules(result.model)
    assert len(modules) == 3 * 7
    for _name, fq in modules:
        zeros = fq.weight == 0
        assert zeros.float().mean() >= 0.5 and torch.all(fq.fake_weight()[zeros] == 0)


@pytest.mark.parametrize("quant,words", [
    ({"special": {"lp": 0.7}}, ["quant.special.lp"]),
    ({"special": {"lp_norm": 1.5}}, ["lp_norm"]),
    ({"special": {"kappa": 0.5}}, ["kappa"]),
    ({"special": {"iters": 0}}, ["iters"]),
    ({"special": {"axis": 2}}, ["axis"]),
    ({"weight": {"bit": 4, "symmetric": True}}, ["symmetric: false"]),
    ({"weight": {"quant_type": "float-quant", "bit": "e4m3", "granularity": "per_channel"}}, ["float-quant"]),
    ({"weight": {"bit": 4, "calib_algo": "learnable"}}, ["learnable"]),
    ({"method": ["HQQ", "GPTQ"]}, ["HQQ quantizes the weights"]),
], ids=["unknown", "lp_norm", "kappa", "iters", "axis", "symmetric", "fp8", "learnable", "not-last"])
def test_bad_keys_one_line(quant, words):
    cfg = {"model": {"path": "/nonexistent"}, "quant": {"method": "HQQ", **quant}}
    with pytest.raises(ConfigError) as exc:
        build_methods(load_config(cfg))
    msg = one_line(exc)
    for word in words:
        assert word in msg, msg


def test_resume_restores_the_hqq_quantizer():
    from llmc.quant.fake_linear import FakeQuantLinear

    for special, cls in (({}, HQQQuantizer), ({"round_zero": True}, IntQuantizer), ({"axis": 0, "round_zero": True},
                                                                                    HQQQuantizer)):
        method = build_methods(load_config({"model": {"path": "/x"}, "quant": hqq_w4(**special)}))[0]
        block = torch.nn.Sequential(torch.nn.Linear(64, 64))
        fq = method.restore_linear(block, "0", FakeQuantLinear)
        assert type(fq.weight_quantizer) is cls and block[0] is fq


def test_bf16_weights_get_representable_scales():
    from llmc.pipeline.blockwise import BlockContext

    method = build_methods(load_config({"model": {"path": "/x"}, "quant": hqq_w4(optimize_scale=True)}))[0]
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(128, 64)).to(torch.bfloat16)
    weight = block[0].weight.detach().clone()
    method.process_block(BlockContext(0, block, None, None, torch.device("cpu"), ["0"]))
    fq = block[0]
    assert torch.equal(fq.w_scale, fq.w_scale.bfloat16().float())  # stored in bf16 without rounding
    with torch.no_grad():
        fake = fq.fake_weight()
    assert fake.dtype == torch.bfloat16
    rtn = IntQuantizer(bit=4, symmetric=False, granularity="per_group", group_size=32).for_dtype(torch.bfloat16)
    (hqq_lp, hqq_mse), (rtn_lp, rtn_mse) = (errors([weight.float()], [w.float()]) for w in (fake, rtn.fake_quant(weight)))
    assert hqq_lp < rtn_lp and hqq_mse < rtn_mse


def test_llmc_round_zp_key_sets_round_zero_and_other_methods_refuse_float_zeros():
    """ModelTC/llmc's configs say `quant.weight.round_zp`; HQQ maps it, SpQR keeps float zeros, RTN integer ones."""
    weight = {"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 64}
    for round_zp in (True, False):
        quant = QuantSection(method="HQQ", weight={**weight, "round_zp": round_zp})
        assert get_methods(quant)[0].special.round_zero is round_zp
    with pytest.raises(ConfigError, match="contradicts"):
        get_methods(QuantSection(method="HQQ", weight={**weight, "round_zp": True}, special={"round_zero": False}))
    with pytest.raises(ConfigError, match=r"RTN keeps integer zero points; remove round_zp \(float zero points: "
                                          r"HQQ, SpQR\)"):
        get_methods(QuantSection(method="RTN", weight={**weight, "round_zp": False}))
    with pytest.raises(ConfigError, match="SpQR keeps float zero points"):
        get_methods(QuantSection(method="SpQR", weight={**weight, "group_size": 16, "round_zp": True}))
    get_methods(QuantSection(method="SpQR", weight={**weight, "group_size": 16, "round_zp": False}))
    get_methods(QuantSection(method="RTN", weight={**weight, "round_zp": True}))
