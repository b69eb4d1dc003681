"""save_autoawq / save_mlcllm: AutoAWQ's GEMM layout, checked with AutoAWQ's own unpacking and by
loading it with transformers (GPTQModel's AWQ torch kernel), against the fake-quantized model."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import tiny_config
from export_checks import autoawq_packing_utils, consumer_load, fp16_reference, fp16_scale_bound, read_tensors

from llmc import compress
from llmc.cli import main
from llmc.export import quantized_linears
from llmc.export.int_packing import pack_awq

W4_G32 = {"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 32}


def test_pack_awq_matches_autoawq_unpack():
    pu = autoawq_packing_utils()
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (64, 48), generator=g)
    zeros = torch.randint(0, 16, (2, 48), generator=g)
    iw, iz = pu.unpack_awq(pack_awq(codes), pack_awq(zeros), 4)
    iw, iz = pu.reverse_awq_order(iw, iz, 4)
    assert torch.equal(iw & 15, codes) and torch.equal(iz & 15, zeros)


@pytest.fixture(scope="module")
def awq_run(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("awq") / "out"
    cfg = tiny_config(
        tiny_llama_dir, quant={"method": "AWQ", "weight": W4_G32, "special": {"n_grid": 4}},
        save={"save_autoawq": True, "save_mlcllm": True, "save_fake": True, "save_path": str(out)},
    )
    cfg.pop("eval")
    return compress(cfg, progress=False), out


def test_autoawq_layout_dequantizes_to_fake_weights(awq_run):
    result, out = awq_run
    pu = autoawq_packing_utils()
    folder = out / "autoawq_quant_model"
    tensors = read_tensors(folder)
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "awq", "zero_point": True, "group_size": 32, "bits": 4, "version": "gemm",
                  "modules_to_not_convert": None}
    layers = quantized_linears(result.model)
    assert len(layers) == 3 * 7
    worst = 0.0
    for layer in layers:
        rows, cols = layer.codes.shape
        qweight, qzeros, scales = (tensors.pop(f"{layer.name}.{k}") for k in ("qweight", "qzeros", "scales"))
        assert f"{layer.name}.weight" not in tensors
        assert qweight.dtype == qzeros.dtype == torch.int32 and scales.dtype == torch.float16
        assert qweight.shape == (cols, rows // 8) and qzeros.shape == (cols // 32, rows // 8)
        assert scales.shape == (cols // 32, rows)
        # AutoAWQ's dequantize_gemm, with the stored float16 scales widened so the product is exact.
        dense = pu.dequantize_gemm(qweight, qzeros, scales.float(), 4, 32).T
        assert torch.equal(dense, fp16_reference(layer)), layer.name
        # Against the float32-scale fake weight the only difference is the scale's float16 rounding.
        diff = (dense - layer.module.fake_weight().detach()).abs().max().item()
        assert diff <= fp16_scale_bound(layer) * (1 + 1e-6)
        worst = max(worst, diff)
    assert 0 < worst < 1e-3
    assert all(t.dtype == torch.float16 for t in tensors.values())  # embeddings, norms, lm_head
    assert (folder / "tokenizer.json").exists()
    # save_mlcllm writes the very same checkpoint.
    mlc = out / "mlcllm_quant_model"
    assert (mlc / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    assert json.loads((mlc / "config.json").read_text())["quantization_config"] == qc


def test_transformers_loads_autoawq_layout(awq_run, tiny_llama_dir, tmp_path):
    """transformers 5 loads AWQ through GPTQModel; its `torch_awq` kernel runs on CPU. A second
    export leaves block 0 in float: modules_to_not_convert must keep transformers off it."""
    result, out = awq_run
    partial_out = tmp_path / "partial"
    cfg = tiny_config(
        tiny_llama_dir, quant={"method": "RTN", "weight": W4_G32, "ignored_layers": {"block_ids": [0]}},
        save={"save_autoawq": True, "save_path": str(partial_out)},
    )
    cfg.pop("eval")
    partial = compress(cfg, progress=False)
    partial_folder = partial_out / "autoawq_quant_model"
    qc = json.loads((partial_folder / "config.json").read_text())["quantization_config"]
    assert qc["modules_to_not_convert"] == [f"model.layers.0.{n}" for n in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    loaded, kernels = consumer_load([out / "autoawq_quant_model", partial_folder], ids, tmp_path)
    assert kernels == ["AwqTorchLinear", "AwqTorchLinear"]
    for run, dense in ((result, loaded[0]), (partial, loaded[1])):
        layers = quantized_linears(run.model)
        assert sorted(k for k in dense if k != "logits") == sorted(q.name for q in layers)
        for layer in layers:
            assert torch.equal(dense[layer.name], fp16_reference(layer)), layer.name
        with torch.no_grad():
            expected = run.model(ids).logits
        # float16 activations in the loaded model vs float32 in ours.
        torch.testing.assert_close(dense["logits"], expected, rtol=0, atol=2e-2)


REFUSED = [
    ({"weight": {**W4_G32, "bit": 8}}, "save_autoawq", "4-bit"),
    ({"weight": {**W4_G32, "symmetric": True}}, "save_mlcllm", "asymmetric"),
    ({"weight": {**W4_G32, "partial_group": True}}, "save_autoawq", "partial_group"),
    ({"weight": {**W4_G32, "granularity": "per_channel", "group_size": -1}}, "save_autoawq", "per_group"),
    ({"weight": W4_G32, "act": {"bit": 8}}, "save_autoawq", "quant.act"),
    ({"method": "GPTQ", "weight": W4_G32, "special": {"actorder": True}}, "save_autoawq", "g_idx"),
    ({"method": ["AWQ", "GPTQ"], "weight": W4_G32, "special": {"GPTQ": {"actorder": True}}}, "save_autoawq",
     "static_groups"),
    ({"weight": {"quant_type": "float-quant", "bit": "e4m3", "granularity": "per_channel", "group_size": -1}},
     "save_gptq", "int-quant"),
]


@pytest.mark.parametrize(("quant", "key", "word"), REFUSED)
def test_impossible_awq_configs_refused_before_calibration(tiny_llama_dir, tmp_path, capsys, quant, key, word):
    save_path = tmp_path / "out"
    cfg = tiny_config(tiny_llama_dir, quant={"method": "RTN", **quant}, save={key: True, "save_path": str(save_path)})
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    assert main(["run", str(path), "-q"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("llmc: error:")]
    assert len(lines) == 1 and key in lines[0] and word in lines[0], err
    assert not save_path.exists() and list(tmp_path.iterdir()) == [path]
