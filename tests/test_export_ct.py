"""compressed-tensors export (save_vllm / save_sgl): written by llmc, read back by compressed-tensors and
transformers.

Each format is checked two ways: compressed-tensors' own compressor decompresses the saved tensors
to weights bit-equal to llmc's fake-quantized weights, and transformers (its compressed-tensors
integration) loads the folder and gives the fake-quant model's logits. Activation quantization is
a runtime op of the serving engine: with `dequantize=True` transformers drops it, so that load is
compared with llmc's weight-only forward; the default (compressed) load applies compressed-tensors'
own activation fake quantization, which equals llmc's for FP8 and static int8 (dynamic int8 per
token differs: compressed-tensors divides absmax by 127.5 where llmc and vLLM's kernels use 127).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_config

from llmc import compress, load_config
from llmc.cli import main
from llmc.quant import fake_quant_modules

pytest.importorskip("compressed_tensors")
pytestmark = pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")

W4_ASYM = {"method": "RTN", "weight": {"bit": 4, "group_size": 32}}
W4_SYM = {"method": "RTN", "weight": {"bit": 4, "group_size": 32, "symmetric": True}}
W8_ASYM_CH = {"method": "RTN", "weight": {"bit": 8, "granularity": "per_channel"}}
W8_SYM_CH = {"method": "RTN", "weight": {"bit": 8, "granularity": "per_channel", "symmetric": True}}
W8A8 = {**W8_SYM_CH, "act": {"bit": 8}}
W8A8_STATIC = {**W8_SYM_CH, "act": {"bit": 8, "granularity": "per_tensor", "static": True}}
FP8_W = {"quant_type": "float-quant", "bit": "e4m3"}
FP8 = {"method": "RTN", "weight": {**FP8_W, "granularity": "per_channel"}, "act": dict(FP8_W)}
FP8_STATIC = {"method": "RTN", "weight": {**FP8_W, "granularity": "per_tensor"},
              "act": {**FP8_W, "granularity": "per_tensor", "static": True}}


def export(model_dir: Path, out: Path, quant: dict, dtype: str = "float32", key: str = "save_vllm"):
    cfg = tiny_config(model_dir, quant=quant, save={key: True, "save_path": str(out)})
    cfg["model"]["torch_dtype"] = dtype
    del cfg["eval"]
    return compress(load_config(cfg), progress=False)


def read_folder(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    return qc, state


def ct_decompress(folder: Path) -> dict[str, torch.Tensor]:
    """Dense weights of every quantized linear, by compressed-tensors' own compressor."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    qc, state = read_folder(folder)
    scheme = QuantizationScheme.model_validate(qc["config_groups"]["group_0"])
    compressor = BaseCompressor.get_value_from_registry(qc["format"])
    modules = {k.rpartition(".")[0] for k in state if k.endswith(".weight_scale")}
    out = {}
    for m in modules:
        local = {k[len(m) + 1:]: v for k, v in state.items() if k.startswith(m + ".") and "." not in k[len(m) + 1:]}
        out[m] = compressor.decompress(local, scheme)["weight"]
    return out


def assert_bit_equal(result, folder: Path) -> None:
    dense = ct_decompress(folder)
    modules = fake_quant_modules(result.model)
    assert sorted(dense) == sorted(n for n, _ in modules)
    for name, module in modules:
        with torch.no_grad():
            fake = module.fake_weight()
        assert dense[name].dtype == fake.dtype, name
        assert torch.equal(dense[name], fake), name


def logits(model, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits.float()


def weight_only_logits(model) -> torch.Tensor:
    saved = [(m, m.act_quantizer) for _, m in fake_quant_modules(model)]
    try:
        for m, _ in saved:
            m.act_quantizer = None
        return logits(model)
    finally:
        for m, aq in saved:
            m.act_quantizer = aq


def hf_load(folder: Path, dequantize: bool):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()


@pytest.mark.parametrize(
    "quant,fmt",
    [(W4_ASYM, "pack-quantized"), (W8_ASYM_CH, "pack-quantized"), (W4_SYM, "pack-quantized")],
    ids=["w4g32-asym", "w8-per-channel-asym", "w4g32-sym"],
)
def test_weight_only_bit_equal(tmp_path, tiny_llama_dir, quant, fmt):
    result = export(tiny_llama_dir, tmp_path / "out", quant)
    folder = tmp_path / "out" / "vllm_quant_model"
    qc, state = read_folder(folder)
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == fmt
    assert qc["quantization_status"] == "compressed" and qc["ignore"] == ["lm_head"]
    w = qc["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["symmetric"]) == (quant["weight"]["bit"], quant["weight"].get("symmetric", False))
    assert qc["config_groups"]["group_0"]["input_activations"] is None
    name = "model.layers.0.mlp.down_proj"
    assert state[f"{name}.weight_packed"].dtype == torch.int32 and f"{name}.weight" not in state
    assert (f"{name}.weight_zero_point" in state) == (not w["symmetric"])
    assert state["model.embed_tokens.weight"].dtype == torch.float32
    assert (folder / "tokenizer.json").is_file()
    assert_bit_equal(result, folder)
    if w["symmetric"]:
        # compressed-tensors 0.20 cannot load asymmetric pack-quantized folders into transformers
        # (on the meta device it leaves weight_zero_point unpacked): symmetric only here.
        assert torch.equal(logits(hf_load(folder, dequantize=False)), logits(result.model))


def test_opt_int8_per_channel_loads_in_transformers(tmp_path, tiny_opt_dir):
    result = export(tiny_opt_dir, tmp_path / "out", W8_SYM_CH)
    folder = tmp_path / "out" / "vllm_quant_model"
    assert_bit_equal(result, folder)
    torch.testing.assert_close(logits(hf_load(folder, dequantize=True)), logits(result.model), rtol=0, atol=1e-5)


@pytest.mark.parametrize("quant,fmt,runtime_equal", [
    (W8A8, "int-quantized", False), (W8A8_STATIC, "int-quantized", True),
    (FP8, "float-quantized", True), (FP8_STATIC, "float-quantized", True),
], ids=["w8a8-int8-dynamic", "w8a8-int8-static", "fp8-channel-dynamic", "fp8-tensor-static"])
def test_w8a8_formats(tmp_path, tiny_llama_dir, quant, fmt, runtime_equal):
    result = export(tiny_llama_dir, tmp_path / "out", quant)
    folder = tmp_path / "out" / "vllm_quant_model"
    qc, state = read_folder(folder)
    assert qc["format"] == fmt
    act = qc["config_groups"]["group_0"]["input_activations"]
    static = quant["act"].get("static", False)
    assert act["dynamic"] is (not static) and act["strategy"] == ("tensor" if static else "token")
    name = "model.layers.1.self_attn.q_proj"
    dtype = torch.float8_e4m3fn if fmt == "float-quantized" else torch.int8
    assert state[f"{name}.weight"].dtype == dtype
    module = result.model.get_submodule(name)
    if static:
        assert torch.equal(state[f"{name}.input_scale"], module.a_scale.reshape(1))
    else:
        assert f"{name}.input_scale" not in state
    assert_bit_equal(result, folder)
    dense = hf_load(folder, dequantize=True)  # activation quantization dropped: compare weight-only
    torch.testing.assert_close(logits(dense), weight_only_logits(result.model), rtol=0, atol=1e-5)
    if runtime_equal:  # compressed-tensors' own runtime activation fake quantization matches llmc's
        torch.testing.assert_close(logits(hf_load(folder, dequantize=False)), logits(result.model),
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype,torch_dtype,quant", [
    ("float16", torch.float16, W4_ASYM), ("bfloat16", torch.bfloat16, W8A8_STATIC),
    ("bfloat16", torch.bfloat16, {**W4_ASYM, "method": "GPTQ"}),
], ids=["fp16-w4-asym", "bf16-w8a8-static", "bf16-gptq-w4-asym"])
def test_half_models_store_scales_in_their_dtype_bit_equal(tmp_path, tiny_llama_dir, dtype, torch_dtype, quant):
    result = export(tiny_llama_dir, tmp_path / "out", quant, dtype=dtype)
    folder = tmp_path / "out" / "vllm_quant_model"
    _, state = read_folder(folder)
    name = "model.layers.0.mlp.up_proj"
    assert state[f"{name}.weight_scale"].dtype == torch_dtype
    assert state["model.norm.weight"].dtype == torch_dtype
    assert_bit_equal(result, folder)
    if "act" in quant:  # the static activation scale llmc used is representable, and stored exactly
        a_scale = result.model.get_submodule(name).a_scale.reshape(1)
        assert state[f"{name}.input_scale"].dtype == torch_dtype
        assert torch.equal(state[f"{name}.input_scale"].float(), a_scale)


def test_ignored_layers_are_listed_and_stay_float(tmp_path, tiny_llama_dir):
    ignored = {"block_ids": [1], "layer_names": ["mlp.down_proj"],
               "speical_names": ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                                 "model.layers.0.self_attn.v_proj"]}
    result = export(tiny_llama_dir, tmp_path / "out", {**W4_SYM, "ignored_layers": ignored})
    folder = tmp_path / "out" / "vllm_quant_model"
    qc, state = read_folder(folder)
    assert len(qc["ignore"]) == 1 + 7 + 2 + 3 and "lm_head" in qc["ignore"]
    assert "model.layers.1.self_attn.o_proj" in qc["ignore"] and "model.layers.2.mlp.down_proj" in qc["ignore"]
    assert state["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32
    assert_bit_equal(result, folder)
    assert torch.equal(logits(hf_load(folder, dequantize=False)), logits(result.model))


def test_save_sgl_writes_the_same_checkpoint(tmp_path, tiny_llama_dir):
    cfg = tiny_config(tiny_llama_dir, quant=W4_SYM,
                      save={"save_vllm": True, "save_sgl": True, "save_path": str(tmp_path / "out")})
    del cfg["eval"]
    compress(load_config(cfg), progress=False)
    vllm, sgl = tmp_path / "out" / "vllm_quant_model", tmp_path / "out" / "sgl_quant_model"
    qv, sv = read_folder(vllm)
    qs, ss = read_folder(sgl)
    assert qv == qs and sv.keys() == ss.keys() and all(torch.equal(sv[k], ss[k]) for k in sv)


@pytest.fixture
def no_heavy_work(monkeypatch):
    import llmc.runner

    def forbidden(*_a, **_k):
        raise AssertionError("work started before the export config was checked")

    for name in ("load_model", "build_calibration", "compress_model"):
        monkeypatch.setattr(llmc.runner, name, forbidden)


@pytest.mark.parametrize("quant,words", [
    ({"method": "RTN", "weight": {"bit": 3, "group_size": 32}}, ["save_vllm", "3-bit", "4 or 8"]),
    ({"method": "RTN", "weight": {"bit": 4, "granularity": "per_tensor"}}, ["per_tensor", "per_channel"]),
    ({"method": "RTN", "weight": {"bit": 4, "group_size": 48, "partial_group": True}}, ["partial_group"]),
    ({"method": "RTN", "weight": {"bit": 4, "group_size": 32}, "act": {"bit": 8}}, ["w4a8", "weight-only"]),
    ({**W8_SYM_CH, "act": {"bit": 8, "symmetric": False}}, ["symmetric: true"]),
    ({**W8_SYM_CH, "act": {"bit": 8, "granularity": "per_tensor"}}, ["per_token", "static"]),
    ({"method": "RTN", "weight": {"bit": 8, "group_size": 32, "symmetric": True}, "act": {"bit": 8}},
     ["per_channel"]),
    ({"method": "RTN", "weight": {**FP8_W, "granularity": "per_channel"}}, ["fp8", "float-quant"]),
    ({"method": "RTN", "weight": {**FP8_W, "granularity": "per_channel"}, "act": {"bit": 8}}, ["float-quant"]),
    ({"method": "GPTQ", "weight": {"bit": 4, "group_size": 32}, "special": {"actorder": True}}, ["actorder"]),
    ({**W4_SYM, "ignored_layers": {"layer_names": ["self_attn.q_proj"]}}, ["self_attn.q_proj", "self_attn.k_proj"]),
    ({**W4_SYM, "ignored_layers": {"speical_names": ["model.layers.1.mlp.up_proj"]}},
     ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.gate_proj"]),
], ids=["w3", "per-tensor", "partial-group", "w4a8", "asym-act", "dynamic-per-tensor-int8",
        "w8a8-grouped", "fp8-weight-only", "fp8-int-act", "gptq-actorder", "split-qkv", "split-gate-up"])
def test_unexportable_configs_are_refused_before_work(tmp_path, tiny_llama_dir, capsys, no_heavy_work, quant,
                                                     words):
    out = tmp_path / "out"
    cfg = tiny_config(tiny_llama_dir, quant=quant, save={"save_vllm": True, "save_path": str(out)})
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    capsys.readouterr()
    assert main(["run", str(path), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llmc: error: save.save_vllm: "), err
    for word in words:
        assert word.lower() in err[0].lower(), (word, err[0])
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


# The real SmolLM2-135M int4 g64 asymmetric export (test_real_smollm2_int4_g64_asym) lives in
# test_export_real_model.py, sharing one RTN run with the AutoAWQ and GPTQ exports.
