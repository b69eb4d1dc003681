"""save_gptq: the GPTQ layout (2/3/4/8 bits, sym v1 / asym gptq_v2, act-order g_idx), loaded by
transformers through optimum + GPTQModel's torch kernel and dequantized by GPTQModel's own code."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import tiny_config
from export_checks import consumer_load, fp16_reference, fp16_scale_bound, read_tensors

from llmc import compress
from llmc.cli import main
from llmc.export import quantized_linears

# (name, quant section): symmetric v1 4-bit, asymmetric 3-bit (3-word packing), 8-bit per-channel,
# asymmetric 2-bit, and GPTQ act-order with dynamic groups (arbitrary g_idx).
CASES = {
    "rtn_w4_sym_g32": {"method": "RTN", "weight": {"bit": 4, "symmetric": True, "group_size": 32}},
    "rtn_w3_asym_g32": {"method": "RTN", "weight": {"bit": 3, "symmetric": False, "group_size": 32}},
    "rtn_w8_sym_channel": {
        "method": "RTN", "weight": {"bit": 8, "symmetric": True, "granularity": "per_channel", "group_size": -1},
    },
    "rtn_w2_asym_g32": {"method": "RTN", "weight": {"bit": 2, "symmetric": False, "group_size": 32}},
    "rtn_w4_asym_block0_float": {
        "method": "RTN", "weight": {"bit": 4, "symmetric": False, "group_size": 32},
        "ignored_layers": {"block_ids": [0], "layer_names": ["mlp.down_proj"]},
    },
    "gptq_w4_asym_actorder": {
        "method": "GPTQ", "weight": {"bit": 4, "symmetric": False, "group_size": 32},
        "special": {"actorder": True, "static_groups": False},
    },
}


@pytest.fixture(scope="module")
def gptq_runs(tiny_llama_dir, tmp_path_factory):
    runs = {}
    for name, quant in CASES.items():
        out = tmp_path_factory.mktemp(name) / "out"
        cfg = tiny_config(tiny_llama_dir, quant=quant, save={"save_gptq": True, "save_path": str(out)})
        cfg.pop("eval")
        runs[name] = (compress(cfg, progress=False), out / "gptq_quant_model")
    return runs


@pytest.mark.parametrize("name", list(CASES))
def test_gptq_layout(gptq_runs, name):
    result, folder = gptq_runs[name]
    w = CASES[name]["weight"]
    bits, sym = w["bit"], w["symmetric"]
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert json.loads((folder / "quantize_config.json").read_text()) == qc
    assert qc["quant_method"] == "gptq" and qc["bits"] == bits and qc["sym"] == sym
    assert qc["group_size"] == w["group_size"] and qc["checkpoint_format"] == ("gptq" if sym else "gptq_v2")
    assert qc["desc_act"] == name.endswith("actorder")
    tensors = read_tensors(folder)
    for layer in quantized_linears(result.model):
        rows, cols = layer.codes.shape
        groups = layer.scale.shape[1]
        t = {k: tensors[f"{layer.name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
        assert t["qweight"].shape == (cols * bits // 32, rows) and t["qweight"].dtype == torch.int32
        assert t["qzeros"].shape == (groups, rows * bits // 32) and t["qzeros"].dtype == torch.int32
        assert t["scales"].shape == (groups, rows) and t["scales"].dtype == torch.float16
        assert torch.equal(t["g_idx"], layer.g_idx) and t["g_idx"].dtype == torch.int32
        if sym:  # classic v1: zero 2^(b-1) stored as 2^(b-1) - 1 in every field (0x77777777 for 4-bit)
            fields = [((t["qzeros"].long() & 0xFFFFFFFF) >> (bits * j)) & (2**bits - 1) for j in range(32 // bits)]
            assert all(torch.all(f == 2 ** (bits - 1) - 1) for f in fields)
    float_names = [n for n in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj")
                   if "ignored_layers" in CASES[name]]
    # Linears left in float stay float16 weights, and the loaders are told to leave them alone.
    assert float_names == [n for n in float_names if f"{n}.weight" in tensors and f"{n}.qweight" not in tensors]
    if float_names:
        assert qc["modules_in_block_to_quantize"] == [[q.name for q in quantized_linears(result.model)]]
    else:
        assert "modules_in_block_to_quantize" not in qc
    if name.endswith("actorder"):
        g_idx = tensors["model.layers.0.mlp.down_proj.g_idx"].long()
        assert not torch.equal(g_idx, torch.arange(g_idx.numel()) // 32)  # arbitrary groups
        assert torch.equal(torch.bincount(g_idx), torch.full((g_idx.numel() // 32,), 32))


def test_transformers_loads_gptq_layouts(gptq_runs, tmp_path):
    """All cases through one consumer process: transformers -> optimum -> GPTQModel TorchLinear."""
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    names = list(CASES)
    loaded, kernels = consumer_load([gptq_runs[n][1] for n in names], ids, tmp_path)
    for name, dense, kernel in zip(names, loaded, kernels):
        result = gptq_runs[name][0]
        assert kernel == "TorchLinear", name
        layers = quantized_linears(result.model)
        assert sorted(k for k in dense if k != "logits") == sorted(q.name for q in layers)
        for layer in layers:
            assert torch.equal(dense[layer.name], fp16_reference(layer)), (name, layer.name)
            diff = (dense[layer.name] - layer.module.fake_weight().detach()).abs().max().item()
            assert diff <= fp16_scale_bound(layer) * (1 + 1e-6), (name, layer.name)
        with torch.no_grad():
            expected = result.model(ids).logits
        torch.testing.assert_close(dense["logits"], expected, rtol=0, atol=2e-2, msg=name)


REFUSED = [
    ({"weight": {"bit": 8, "symmetric": True, "granularity": "per_channel", "group_size": -1},
      "act": {"bit": 8}}, "quant.act"),
    ({"weight": {"bit": 5, "group_size": 32}}, "5-bit"),
    ({"weight": {"bit": 4, "granularity": "per_tensor", "group_size": -1}}, "per_tensor"),
    ({"weight": {"bit": 4, "group_size": 32, "partial_group": True}}, "partial_group"),
]


@pytest.mark.parametrize(("quant", "word"), REFUSED)
def test_impossible_gptq_configs_refused_before_calibration(tiny_llama_dir, tmp_path, capsys, quant, word):
    save_path = tmp_path / "out"
    cfg = tiny_config(tiny_llama_dir, quant={"method": "GPTQ", **quant},
                      save={"save_gptq": True, "save_path": str(save_path)})
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    assert main(["run", str(path), "-q"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("llmc: error:")]
    assert len(lines) == 1 and "save_gptq" in lines[0] and word in lines[0], err
    assert not save_path.exists() and list(tmp_path.iterdir()) == [path]


def test_large_checkpoints_are_sharded_with_an_index(tmp_path):
    from safetensors.torch import load_file

    from llmc.export.packed_checkpoint import save_shards

    state = {f"t{i}": torch.full((256,), float(i), dtype=torch.float16) for i in range(5)}
    save_shards(state, tmp_path, max_bytes=1024)  # two 512-byte tensors per shard
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 512
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    for key, tensor in state.items():
        assert torch.equal(load_file(str(tmp_path / index["weight_map"][key]))[key], tensor)
