"""`llmc inspect PATH` on compressed-tensors exports, dense folders, hand-made AutoAWQ/GPTQ folders and bad paths."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import save_file

from llmc import compress, load_config
from llmc.cli import main
from llmc.inspect import compact_names, inspect_checkpoint
from llmc.sparsity import follows_n_m

pytest.importorskip("compressed_tensors")


def run_inspect(capsys, path: Path, *flags: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["inspect", str(path), *flags])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_llama_dir) -> Path:
    out = tmp_path_factory.mktemp("inspect") / "out"
    cfg = tiny_config(tiny_llama_dir, quant={"method": "RTN", "weight": {"bit": 4, "group_size": 32}},
                      save={"save_vllm": True, "save_path": str(out)})
    del cfg["eval"]
    compress(load_config(cfg), progress=False)
    return out / "vllm_quant_model"


def test_compressed_tensors_folder(capsys, exported):
    code, out, _ = run_inspect(capsys, exported)
    assert code == 0
    assert "compressed-tensors (pack-quantized)" in out
    assert "int4, group 32, asymmetric" in out
    assert "none (weight-only)" in out
    assert "21 modules: model.layers.{0..2}.mlp.down_proj;" in out
    assert "not quantized  9 modules: lm_head; model.embed_tokens;" in out
    info = inspect_checkpoint(exported)
    linears = 3 * (3 * 64 * 128 + 2 * 64 * 64 + 2 * 32 * 64)  # mlp + q/o + k/v
    assert info.quantized_params == linears
    assert info.params == linears + 2 * 384 * 64 + 7 * 64
    assert 0.9 <= info.ratio <= 1.1, info.ratio
    dense = info.params * 4
    assert info.disk_bytes < 0.6 * dense


def test_w8a8_fp8_and_dense_folders(capsys, tmp_path, tiny_llama_dir):
    cfg = tiny_config(tiny_llama_dir, quant={
        "method": "RTN", "weight": {"quant_type": "float-quant", "bit": "e4m3", "granularity": "per_channel"},
        "act": {"quant_type": "float-quant", "bit": "e4m3"}}, save={"save_vllm": True, "save_path": str(tmp_path)})
    del cfg["eval"]
    compress(load_config(cfg), progress=False)
    code, out, _ = run_inspect(capsys, tmp_path / "vllm_quant_model")
    assert code == 0 and "compressed-tensors (float-quantized)" in out
    assert "fp8 e4m3, per channel, symmetric" in out and "fp8 e4m3, per token, symmetric, dynamic" in out
    assert 0.9 <= inspect_checkpoint(tmp_path / "vllm_quant_model").ratio <= 1.1
    code, out, _ = run_inspect(capsys, tiny_llama_dir)
    assert code == 0 and "format         dense" in out and "float (F32)" in out and "0 modules" in out
    assert 0.9 <= inspect_checkpoint(tiny_llama_dir).ratio <= 1.1


def _hand_made(folder: Path, qc: dict, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": qc}))
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def test_autoawq_and_gptq_folders(capsys, tmp_path):
    """Layouts as AutoAWQ (GEMM) and GPTQ write them: 4-bit, group 32, one 64 -> 128 linear."""
    g = torch.Generator().manual_seed(0)
    ints = lambda *shape: torch.randint(0, 2**31 - 1, shape, generator=g, dtype=torch.int32)  # noqa: E731
    common = {"model.embed_tokens.weight": torch.zeros(100, 64, dtype=torch.float16),
              "model.norm.weight": torch.ones(64, dtype=torch.float16)}
    awq = _hand_made(tmp_path / "awq", {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
                                        "version": "gemm"}, {
        **common, "model.layers.0.mlp.up_proj.qweight": ints(64, 16), "model.layers.0.mlp.up_proj.qzeros": ints(2, 16),
        "model.layers.0.mlp.up_proj.scales": torch.ones(2, 128, dtype=torch.float16)})
    gptq = _hand_made(tmp_path / "gptq", {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True,
                                          "desc_act": False}, {
        **common, "model.layers.0.mlp.up_proj.qweight": ints(8, 128), "model.layers.0.mlp.up_proj.qzeros": ints(2, 16),
        "model.layers.0.mlp.up_proj.scales": torch.ones(2, 128, dtype=torch.float16),
        "model.layers.0.mlp.up_proj.g_idx": torch.arange(64, dtype=torch.int32) // 32})
    for folder, fmt, weights in ((awq, "awq", "int4, group 32, asymmetric, gemm"),
                                 (gptq, "gptq", "int4, group 32, symmetric")):
        code, out, _ = run_inspect(capsys, folder)
        assert code == 0, out
        assert f"format         {fmt}\n" in out and weights in out
        assert "quantized      1 modules: model.layers.0.mlp.up_proj" in out
        info = inspect_checkpoint(folder)
        assert info.sparsity is None and "sparsity       not measured" in out
        assert info.quantized_params == 64 * 128 and info.params == 64 * 128 + 100 * 64 + 64
        extra = 2 * 16 * 4 + 2 * 128 * 2 + (64 * 4 if fmt == "gptq" else 0)
        assert info.theoretical_bytes == 64 * 128 // 2 + extra + (100 * 64 + 64) * 2
        assert 0.9 <= info.ratio <= 1.1


@pytest.mark.reliability("inspect")
@pytest.mark.parametrize("case", ["missing", "file", "no-config", "no-safetensors", "bad-json"])
def test_bad_paths_are_one_line_errors(capsys, tmp_path, case):
    path = tmp_path / "ckpt"
    if case == "file":
        path.write_text("x")
    elif case != "missing":
        path.mkdir()
        if case != "no-config":
            (path / "config.json").write_text("{" if case == "bad-json" else "{}")
    code, out, err = run_inspect(capsys, path)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmc: error: "), err
    word = {"missing": "does not exist", "file": "is a file", "no-config": "no config.json",
            "no-safetensors": "no .safetensors", "bad-json": "not valid JSON"}[case]
    assert word in lines[0]


def test_compact_names():
    names = [f"model.layers.{i}.mlp.up_proj" for i in range(4)] + ["lm_head", "model.layers.7.x", "a.1.b", "a.3.b"]
    assert compact_names(names) == ["model.layers.{0..3}.mlp.up_proj", "lm_head", "model.layers.7.x", "a.{1,3}.b"]


def _zeros_in_memory(model, fake: bool) -> dict[str, tuple[int, int, bool]]:
    """Per linear of the in-memory model: (zeros, weights, 2:4) of the weight a folder stores."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) or hasattr(m, "fake_weight"):
            with torch.no_grad():
                w = m.fake_weight() if fake and hasattr(m, "fake_weight") else m.weight
            out[name] = (int((w == 0).sum()), w.numel(), follows_n_m(w))
    return out


def test_sparsity_of_saved_folders(capsys, tmp_path, tiny_llama_dir):
    """Wanda 2:4 + RTN int4 asymmetric: the float (save_trans), fake-quantized (save_fake) and compressed-tensors
    (save_vllm, decompressed by the library) folders report the zeros of the in-memory weights they hold."""
    cfg = tiny_config(tiny_llama_dir, sparse={"method": "Wanda", "weight": {"sparsity": 0.5, "pattern": "2:4"}},
                      quant={"method": "RTN", "weight": {"bit": 4, "group_size": 32}},
                      save={"save_trans": True, "save_fake": True, "save_vllm": True, "save_path": str(tmp_path)})
    del cfg["eval"]
    result = compress(load_config(cfg), progress=False)
    seen = set()
    for sub, fake in (("transformed_model", False), ("fake_quant_model", True), ("vllm_quant_model", True)):
        expected = _zeros_in_memory(result.model, fake)
        info = inspect_checkpoint(tmp_path / sub)
        assert {s.name: (s.zeros, s.numel, s.two_four) for s in info.sparsity} == expected, sub
        zeros, numel = sum(v[0] for v in expected.values()), sum(v[1] for v in expected.values())
        seen.add(zeros)
        code, out, _ = run_inspect(capsys, tmp_path / sub)
        assert code == 0
        assert f"sparsity       {zeros / numel:.2%} zeros over 22 linear layers ({zeros:,} of {numel:,} weights); " \
               f"21 of 22 are 2:4" in out, out
        z, n, _ = expected["model.layers.0.mlp.up_proj"]
        assert re.search(rf"^  model\.layers\.0\.mlp\.up_proj +{re.escape(f'{z / n:.2%}')}  2:4$", out, re.M), out
        assert re.search(r"^  lm_head +0\.00%  -$", out, re.M), out
        assert ("declared 2:4 (dense" in out) == (sub == "vllm_quant_model")
    assert len(seen) == 2  # rounding to the zero point adds zeros: the fake-quantized counts differ from float
    code, out, _ = run_inspect(capsys, tmp_path / "vllm_quant_model", "--no-sparsity")
    assert code == 0 and "sparsity       not measured" in out and "mlp.up_proj  " not in out


def _legacy(folder: Path, qc: dict, module: str, tensors: dict[str, torch.Tensor]) -> Path:
    common = {"model.embed_tokens.weight": torch.zeros(100, 64)}
    return _hand_made(folder, qc, {**common, **{f"{module}.{k}": v for k, v in tensors.items()}})


def test_sparsity_of_legacy_bitmask_folders(capsys, tmp_path):
    """sparse-24-bitmask (float and int8) and sparse-bitmask folders in the layout older compressed-tensors wrote."""
    from compressed_tensors.utils import pack_bitmasks

    g = torch.Generator().manual_seed(0)
    dense = torch.randn(128, 64, generator=g)
    groups = dense.reshape(128, 16, 4)
    kept = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.abs().topk(2, dim=-1).indices, True)
    w24 = torch.where(kept, groups, 0.0).reshape(128, 64)
    w24[5, :8] = 0.0  # two groups with four zeros: zero values are stored among the kept ones
    kept = kept.reshape(128, 64)
    unstructured = torch.where(torch.rand(128, 64, generator=g) < 0.7, 0.0, dense)
    mask = unstructured != 0
    name = "model.layers.0.mlp.up_proj"
    shape24 = torch.tensor([128, 64]).reshape(-1, 1)
    int8 = {"weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}, "targets": ["Linear"]}
    sparse24 = {"format": "sparse-24-bitmask", "sparsity_structure": "2:4", "global_sparsity": 0.5}
    folders = [
        (_legacy(tmp_path / "s24", {"quant_method": "compressed-tensors", "sparsity_config": sparse24}, name,
                 {"compressed": w24[kept].reshape(128, 32), "bitmask": pack_bitmasks(kept), "shape": shape24}),
         w24, "compressed-tensors (sparse-24-bitmask)", 0),
        (_legacy(tmp_path / "bitmask", {"quant_method": "compressed-tensors", "sparsity_config": {
            "format": "sparse-bitmask", "sparsity_structure": "unstructured"}}, name,
            {"compressed": unstructured[mask], "bitmask": pack_bitmasks(mask), "shape": torch.tensor([128, 64]),
             "row_offsets": torch.cumsum(mask.sum(1), 0) - mask.sum(1)}),
         unstructured, "compressed-tensors (sparse-bitmask)", 0),
        (_legacy(tmp_path / "int8", {"quant_method": "compressed-tensors", "format": "int-quantized",
                                     "config_groups": {"group_0": int8}, "sparsity_config": sparse24}, name,
                 {"compressed": (w24[kept] * 40).round().to(torch.int8).reshape(128, 32),
                  "bitmask": pack_bitmasks(kept), "shape": shape24, "weight_scale": torch.full((128, 1), 0.025)}),
         (w24 * 40).round(), "compressed-tensors (int-quantized + sparse-24-bitmask)", 128 * 64),
    ]
    for folder, weight, fmt, quantized in folders:
        zeros = int((weight == 0).sum())
        info = inspect_checkpoint(folder)
        assert [(s.name, s.zeros, s.numel, s.two_four) for s in info.sparsity] == [
            (name, zeros, 128 * 64, follows_n_m(weight))], folder
        assert info.format == fmt and info.quantized_params == quantized
        assert info.params == 128 * 64 + 100 * 64  # the sparse weight counts at its dense shape
        code, out, _ = run_inspect(capsys, folder)
        assert code == 0 and f"({zeros:,} of {128 * 64:,} weights)" in out, out
