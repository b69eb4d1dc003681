"""Pruned models through save_vllm / save_sgl (`llmc.export.ct_sparse`), read back by compressed-tensors and
transformers.

Checked combinations, on the tiny Llama (widths 64 and 128, so int4 groups of 32 stand for 128):

* sparse only (Wanda 2:4, Magnitude unstructured 50%): a plain float folder, its weights equal to the
  pruned in-memory weights (same bits), `llmc_sparsity` measured on them; transformers loads it with
  the in-memory logits; save_sgl writes the same files.
* Wanda 2:4 + int4 g32 symmetric (pack-quantized), 2:4 + W8A8 int8 (int-quantized), 2:4 + FP8 W8A8
  (float-quantized), Magnitude unstructured + int4 g32 asymmetric (pack-quantized): compressed-tensors'
  own compressor decompresses every quantized linear bit-equal to llmc's fake-quantized pruned weight,
  whose zeros include every pruned weight; transformers loads the symmetric int4 folder (compressed, exact
  logits) and the W8A8 ones (`dequantize=True`, weight-only logits within 1e-5); it cannot load
  asymmetric pack-quantized folders (see test_export_ct).
* a claimed 2:4 that the weights to export break is a one-line ModelError and nothing is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_config
from test_export_ct import (
    FP8,
    W8A8,
    assert_bit_equal,
    ct_decompress,
    hf_load,
    logits,
    read_folder,
    weight_only_logits,
)

from llmc import compress, load_config
from llmc.cli import main
from llmc.errors import ModelError
from llmc.export import EXPORTERS
from llmc.methods.sparse_base import is_pruned
from llmc.sparsity import follows_n_m

pytest.importorskip("compressed_tensors")
pytestmark = pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")

SPARSE_24 = {"method": "Wanda", "weight": {"sparsity": 0.5, "pattern": "2:4"}}
UNSTRUCTURED = {"method": "Magnitude", "weight": {"sparsity": 0.5}}
W4_SYM = {"method": "RTN", "weight": {"bit": 4, "group_size": 32, "symmetric": True}}
W4_ASYM = {"method": "RTN", "weight": {"bit": 4, "group_size": 32}}


def export(model_dir: Path, out: Path, sparse: dict, quant: dict | None = None, keys=("save_vllm",)):
    cfg = tiny_config(model_dir, sparse=sparse, save={**dict.fromkeys(keys, True), "save_path": str(out)})
    if quant is not None:
        cfg["quant"] = quant
    del cfg["eval"]
    return compress(load_config(cfg), progress=False)


def written(module) -> torch.Tensor:
    with torch.no_grad():
        return (module.fake_weight() if hasattr(module, "fake_weight") else module.weight).detach()


def pruned(result) -> dict[str, torch.nn.Module]:
    modules = {n: m for n, m in result.model.named_modules() if is_pruned(m)}
    assert len(modules) == 21  # every block linear of the 3 blocks
    return modules


def expected_record(result, structure: str) -> dict:
    weights = [written(m) for m in pruned(result).values()]
    zeros = sum(int((w == 0).sum()) for w in weights)
    return {"format": "dense", "sparsity_structure": structure, "targets": ["Linear"], "ignore": ["lm_head"],
            "global_sparsity": zeros / sum(w.numel() for w in weights)}


def check_pattern(result, structure: str, weights: dict[str, torch.Tensor]) -> None:
    for name, module in pruned(result).items():
        w = weights[name]
        assert ((w == 0) | (module.weight != 0)).all(), name  # every pruned weight stays exactly 0
        if structure == "2:4":
            assert follows_n_m(w), name
        else:
            assert ((module.weight == 0).sum(dim=1) >= w.shape[1] // 2).all(), name


def read_folder_dense(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    return json.loads((folder / "config.json").read_text()), state


@pytest.mark.parametrize("sparse,structure", [(SPARSE_24, "2:4"), (UNSTRUCTURED, "unstructured")],
                         ids=["wanda-2of4", "magnitude-unstructured"])
def test_sparse_only_writes_the_pruned_float_model(tmp_path, tiny_llama_dir, sparse, structure):
    from transformers import AutoModelForCausalLM

    result = export(tiny_llama_dir, tmp_path / "out", sparse, keys=("save_vllm", "save_sgl"))
    folder = tmp_path / "out" / "vllm_quant_model"
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config  # nothing for an engine to dispatch on: a dense model
    assert config["llmc_sparsity"] == expected_record(result, structure)
    _, state = read_folder_dense(folder)
    memory = result.model.state_dict()
    assert state.keys() == memory.keys() and all(torch.equal(state[k], memory[k]) for k in state)
    check_pattern(result, structure, {n: state[f"{n}.weight"] for n in pruned(result)})
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(reloaded), logits(result.model), rtol=0, atol=1e-5)
    _, sgl = read_folder_dense(tmp_path / "out" / "sgl_quant_model")
    assert sgl.keys() == state.keys() and all(torch.equal(sgl[k], state[k]) for k in state)


@pytest.mark.parametrize("sparse,quant,fmt,structure,load", [
    (SPARSE_24, W4_SYM, "pack-quantized", "2:4", "compressed"),
    (SPARSE_24, W8A8, "int-quantized", "2:4", "dequantize"),
    (SPARSE_24, FP8, "float-quantized", "2:4", "dequantize"),
    (UNSTRUCTURED, W4_ASYM, "pack-quantized", "unstructured", None),
], ids=["2of4-w4a16-sym", "2of4-w8a8-int8", "2of4-fp8", "unstructured-w4a16-asym"])
def test_sparse_quantized_export_decompresses_bit_equal(tmp_path, tiny_llama_dir, sparse, quant, fmt, structure,
                                                        load):
    result = export(tiny_llama_dir, tmp_path / "out", sparse, quant)
    folder = tmp_path / "out" / "vllm_quant_model"
    qc, _ = read_folder(folder)
    config = json.loads((folder / "config.json").read_text())
    assert qc["format"] == fmt and qc["sparsity_config"] == {}  # as compressed-tensors 0.20 writes it
    assert config["llmc_sparsity"] == expected_record(result, structure)
    assert_bit_equal(result, folder)  # compressed-tensors' decompression == fake-quantized pruned weights
    check_pattern(result, structure, ct_decompress(folder))
    if load == "compressed":
        assert torch.equal(logits(hf_load(folder, dequantize=False)), logits(result.model))
    elif load == "dequantize":
        torch.testing.assert_close(logits(hf_load(folder, dequantize=True)), weight_only_logits(result.model),
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("quant", [None, W4_SYM], ids=["sparse-only", "w4a16"])
def test_broken_pattern_is_refused(tmp_path, tiny_llama_dir, quant):
    result = export(tiny_llama_dir, tmp_path / "unused", SPARSE_24, quant, keys=())
    name = "model.layers.1.mlp.up_proj"
    with torch.no_grad():
        result.model.get_submodule(name).weight[3, 4:8] = 0.05  # a group of 4 with no zero
    folder = tmp_path / "again"
    folder.mkdir()
    with pytest.raises(ModelError) as err:
        EXPORTERS["save_vllm"].write(result.model, result.tokenizer, folder, result.config)
    message = str(err.value)
    assert "\n" not in message and f"{name} row 3, inputs 4..7" in message and "2:4" in message, message
    assert not any(folder.iterdir())


def test_export_needs_quant_or_sparse(tmp_path, tiny_llama_dir, capsys):
    cfg = tiny_config(tiny_llama_dir, save={"save_vllm": True, "save_path": str(tmp_path / "out")})
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    capsys.readouterr()
    assert main(["run", str(path), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llmc: error: save.save_vllm: there is no quant or sparse section")
    for key in ("save_vllm", "save_sgl"):
        EXPORTERS[key].check(load_config(tiny_config(tiny_llama_dir, sparse=SPARSE_24,
                                                     save={key: True, "save_path": str(tmp_path / "x")})))
