"""GPTQ with NVFP4, MXFP4 and MXFP8 weights: every weight stays on the format's grid with the stored
scales, NVFP4's global scale is the original weights', GPTQ beats RTN of the same format on the
calibration inputs, exports decompress bit-equal, and the refused combinations are one-line errors."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from test_gptq import ToyBlock, correlated_inputs, rtn_and_gptq_errors

from llmc import compress, load_config
from llmc.config.schema import QuantSection
from llmc.errors import ConfigError
from llmc.methods.base import get_methods
from llmc.methods.gptq import GPTQ, gptq_quantize
from llmc.quant import fake_quant_modules
from llmc.quant.microscaling import MXQuantizer, NVFP4Quantizer

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.quantization.utils import generate_gparam  # noqa: E402
from test_formats import FUSED, decompress  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")

FORMATS = {"nvfp4": NVFP4Quantizer(), "mxfp4": MXQuantizer("e2m1"), "mxfp8": MXQuantizer("e4m3")}
# (static_groups, actorder): llmc's default, llm-compressor's up-front scales, and act-order over fixed groups.
VARIANTS = [(False, False), (True, False), (True, True)]


def gparam(weights: list[torch.Tensor]) -> torch.Tensor:
    """compressed-tensors' NVFP4 global scale of linears fused together (the smallest one)."""
    return min(generate_gparam(w.min(), w.max()) for w in weights)


@pytest.mark.parametrize("static_groups,actorder", VARIANTS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_layer_on_grid_and_below_rtn(fmt, static_groups, actorder):
    q = FORMATS[fmt]
    x = correlated_inputs(tokens=1024, features=128, seed=3)
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(4)) / 128**0.5
    res = gptq_quantize(w, 2 / x.shape[0] * x.T @ x, q, static_groups=static_groups, actorder=actorder)
    assert torch.equal(q.quant_dequant(res.weight, res.scale, res.zero), res.weight)  # on the grid
    assert torch.equal(res.g_idx, torch.arange(128) // q.group_size)
    rtn_scale, rtn_zero = q.calc_qparams(w)
    if fmt == "nvfp4":
        assert (res.zero == gparam([w])).all() and torch.equal(res.zero, rtn_zero)
    if static_groups:  # llm-compressor: every group's scale from the original weight, up front
        assert torch.equal(res.scale, rtn_scale)
    else:  # the first group sees the original columns, later ones the columns GPTQ updated
        per_row = res.scale.view(96, -1)
        assert torch.equal(per_row[:, 0], rtn_scale.view(96, -1)[:, 0])
        assert not torch.equal(per_row, rtn_scale.view(96, -1))
    gptq_err = torch.linalg.norm((w - res.weight) @ x.T)
    rtn_err = torch.linalg.norm((w - q.quant_dequant(w, rtn_scale, rtn_zero)) @ x.T)
    assert gptq_err < 0.7 * rtn_err


@pytest.mark.parametrize("fmt", FORMATS)
def test_block_on_grid_and_below_rtn_on_calibration_inputs(fmt):
    errors, block = rtn_and_gptq_errors(lambda: GPTQ(QuantSection(method="GPTQ", weight={"quant_type": fmt})))
    reference = ToyBlock()
    for lin, fq in fake_quant_modules(block):
        assert type(fq.weight_quantizer) is type(FORMATS[fmt]) and torch.equal(fq.fake_weight(), fq.weight), lin
    if fmt == "nvfp4":  # up and gate share an input: one global scale, from their original weights
        assert (block.up.w_zero == gparam([reference.up.weight, reference.gate.weight])).all()
        assert torch.equal(block.up.w_zero[:1], block.gate.w_zero[:1])
        assert (block.down.w_zero == gparam([reference.down.weight])).all()
    assert errors["gptq"] < 0.8 * errors["rtn"], errors


def run(model_dir, out, quant: dict, dtype: str = "float32"):
    save = {"save_vllm": True, "save_path": str(out)} if out is not None else {}
    cfg = tiny_config(model_dir, quant=quant, save=save)
    cfg["model"]["torch_dtype"] = dtype
    del cfg["eval"]
    return compress(load_config(cfg), progress=False)


@pytest.mark.parametrize("fmt,act,dtype", [("nvfp4", {"quant_type": "nvfp4", "static": True}, "bfloat16"),
                                           ("mxfp4", None, "float32"), ("mxfp8", None, "bfloat16")])
def test_pipeline_and_export_decompress_bit_equal(tmp_path, tiny_llama_dir, fmt, act, dtype):
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=getattr(torch, dtype))
    quant = {"method": "GPTQ", "weight": {"quant_type": fmt}, **({"act": act} if act else {})}
    result = run(tiny_llama_dir, tmp_path / "out", quant, dtype)
    modules = dict(fake_quant_modules(result.model))
    assert len(modules) == 3 * 7
    for name, module in modules.items():
        assert torch.equal(module.fake_weight(), module.weight), name  # GPTQ left every weight on the grid
    if fmt == "nvfp4":
        for block in range(3):
            for group in FUSED + (("self_attn.o_proj",), ("mlp.down_proj",)):
                names = [f"model.layers.{block}.{leaf}" for leaf in group]
                glob = gparam([original.get_submodule(n).weight.detach().float() for n in names])
                for n in names:
                    assert (modules[n].w_zero == glob).all(), n
    qc, local, dense = decompress(tmp_path / "out" / "vllm_quant_model")
    assert qc["format"] == {"nvfp4": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized",
                            "mxfp8": "mxfp8-quantized"}[fmt]
    assert sorted(dense) == sorted(modules)
    for name, module in modules.items():  # the library dequantizes these formats in bfloat16
        assert torch.equal(dense[name], module.fake_weight().detach().to(torch.bfloat16)), name
        if act:
            assert local[name]["input_global_scale"] == module.a_zero[0, 0] > 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_actorder_needs_static_groups(fmt):
    get_methods(QuantSection(method="GPTQ", weight={"quant_type": fmt},
                             special={"actorder": True, "static_groups": True}))
    with pytest.raises(ConfigError) as exc:
        get_methods(QuantSection(method="GPTQ", weight={"quant_type": fmt}, special={"actorder": True}))
    msg = str(exc.value)
    assert "\n" not in msg and f"actorder with quant_type {fmt} needs quant.special.static_groups: true" in msg


def test_fp8_blocks_stay_refused_with_the_reason():
    weight = {"quant_type": "float-quant", "bit": "e4m3", "granularity": "per_block"}
    with pytest.raises(ConfigError) as exc:
        get_methods(QuantSection(method="GPTQ", weight=weight))
    msg = str(exc.value)
    assert "\n" not in msg and "GPTQ does not support quant_type: float-quant (FP8)" in msg
    assert "128 rows" in msg and "RTN" in msg and "int-quant, mxfp4, mxfp8, nvfp4" in msg
