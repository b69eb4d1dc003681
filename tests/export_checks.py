"""Helpers of the AutoAWQ / GPTQ export tests: the reference dense weight and the consumer libraries."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from llmc.export import QuantizedLinear

HERE = Path(__file__).parent


def fp16_reference(layer: QuantizedLinear) -> torch.Tensor:
    """Our fake-quantized weight recomputed with the float16-rounded scales the layouts store:
    the same integer codes and zero points, `(codes - zero) * fp16(scale)` in float32 (exact)."""
    idx = layer.g_idx.long()
    scale = layer.scale.half().float()
    return (layer.codes.float() - layer.zero[:, idx]) * scale[:, idx]


def fp16_scale_bound(layer: QuantizedLinear) -> float:
    """Largest possible |dequantized - fake weight|: max |q - z| times the largest scale rounding."""
    spread = 2**layer.quantizer.bit - 1
    return spread * (layer.scale - layer.scale.half().float()).abs().max().item()


def autoawq_packing_utils():
    """AutoAWQ's `awq/utils/packing_utils.py`, loaded alone: `import awq` pulls its model zoo
    (and triton); the packing module itself needs only torch."""
    spec = importlib.util.find_spec("awq")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("AutoAWQ is not installed (make setup installs it with --no-deps)")
    path = Path(spec.submodule_search_locations[0]) / "utils" / "packing_utils.py"
    mod_spec = importlib.util.spec_from_file_location("autoawq_packing_utils", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


def consumer_load(folders: list[Path], ids: torch.Tensor, tmp: Path) -> tuple[list[dict], list[str]]:
    """Per folder, the library-dequantized weights and logits (see export_consumer.py), and kernel names."""
    if importlib.util.find_spec("gptqmodel") is None or importlib.util.find_spec("optimum") is None:
        pytest.skip("GPTQModel / optimum not installed (make setup installs them with --no-deps)")
    out, ids_path = tmp / "consumer.safetensors", tmp / "ids.pt"
    torch.save(ids, ids_path)
    # GPTQModel torch.compile's its dequantization on first use (about 10 s per layer shape on CPU).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TORCH_COMPILE_DISABLE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, str(HERE / "export_consumer.py"), str(out), str(ids_path), *map(str, folders)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results: list[dict] = [{} for _ in folders]
    with safe_open(str(out), "pt") as f:
        kernels = json.loads(f.metadata()["kernels"])
        for key in f.keys():
            i, name = key.split("/", 1)
            results[int(i)][name] = f.get_tensor(key)
    return results, [kernels.get(str(i), "") for i in range(len(folders))]


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}
