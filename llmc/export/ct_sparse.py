"""Pruned models (`sparse:` section) in the checkpoints of `save.save_vllm` / `save.save_sgl`.

What reads sparse compressed-tensors today (checked against the installed package and vLLM):

* compressed-tensors >= 0.15 has no sparsity compressors: `sparse-bitmask`, `sparse-24-bitmask`
  and `marlin-24` survive only as `CompressionFormat` names and `SparsityCompressionConfig`
  classes; `ModelCompressor` neither compresses nor decompresses sparse weights, and its
  `update_config` writes `sparsity_config: {}` ("sparsity is removed for now").
* vLLM dropped the readers: marlin-24 (W4A16 2:4) in early 2026, and from v0.19 the CUTLASS 2:4
  scheme (`CompressedTensors24`: sparse-only, W8A8 FP8 and int8) raises NotImplementedError, so a
  checkpoint whose `quantization_config.sparsity_config` declares 2:4 for such layers does not
  load. `sparse-bitmask` never had a vLLM reader.

So a pruned model is written in the formats current vLLM, SGLang and transformers load, zeros
stored as they are (dense kernels, no sparse speed-up):

* sparse only: a plain transformers folder, the pruned weights in the model's dtype and no
  `quantization_config` (what compressed-tensors itself writes without quantization);
* sparse + quant: the compressed-tensors checkpoint of `compressed_tensors.py`; a pruned weight
  dequantizes to exactly 0 (code 0, or the zero point for asymmetric weights), and
  `quantization_config.sparsity_config` stays `{}` as the library writes it.

The sparsity is recorded in config.json under `llmc_sparsity`, a key no engine reads, in
compressed-tensors' `SparsityCompressionConfig` shape: `{format: dense, sparsity_structure,
global_sparsity, targets: [Linear], ignore: the linears not pruned}`. The structure is measured on
the weights written (fake-quantized ones when quantized): a claimed N:M `sparse.weight.pattern` is
verified, a weight that breaks it is a ModelError and nothing is written; otherwise it is 2:4 when
every pruned weight happens to be, else unstructured.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor, nn

from llmc.config.schema import LlmcConfig
from llmc.errors import ModelError
from llmc.quant.fake_linear import FakeQuantLinear
from llmc.sparsity import follows_n_m, n_m_violation

SPARSITY_KEY = "llmc_sparsity"


def written_weight(module: nn.Module) -> Tensor:
    """A linear's weight as the checkpoint stores it (dequantized): fake-quantized when quantized."""
    if isinstance(module, FakeQuantLinear):
        return module.fake_weight().detach()
    return module.weight.detach()


def check_pattern(cfg: LlmcConfig, name: str, weight: Tensor) -> None:
    """ModelError when the claimed N:M pattern does not hold for this written weight."""
    n_m = cfg.sparse.weight.n_m
    bad = None if n_m is None else n_m_violation(weight, *n_m)
    if bad is not None:
        row, col = bad
        raise ModelError(
            f"sparse.weight.pattern {cfg.sparse.weight.pattern} does not hold in the weights to export: {name} row "
            f"{row}, inputs {col}..{col + n_m[1] - 1} have fewer than {n_m[0]} zeros (changed after pruning); "
            f"nothing was written"
        )


def sparsity_record(model: nn.Module, cfg: LlmcConfig) -> dict | None:
    """The `llmc_sparsity` entry (None without pruned linears), after checking a claimed pattern."""
    from compressed_tensors.config import DenseSparsityConfig

    from llmc.methods.sparse_base import is_pruned

    if cfg.sparse is None:
        return None
    zeros = numel = 0
    pruned: list[str] = []
    two_four = True
    for name, module in model.named_modules():
        if not is_pruned(module):
            continue
        weight = written_weight(module)
        check_pattern(cfg, name, weight)
        pruned.append(name)
        zeros += int((weight == 0).sum())
        numel += weight.numel()
        two_four = two_four and follows_n_m(weight, 2, 4)
    if not pruned:
        return None
    structure = cfg.sparse.weight.pattern if cfg.sparse.weight.n_m else ("2:4" if two_four else "unstructured")
    kept = set(pruned)
    ignore = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, FakeQuantLinear)) and n not in kept]
    record = DenseSparsityConfig(targets=["Linear"], ignore=ignore, global_sparsity=zeros / numel,
                                 sparsity_structure=structure)
    return record.model_dump(exclude={"registry_requires_subclass"})  # RegistryMixin's own field


def add_sparsity_record(folder: Path, record: dict | None) -> None:
    if record is None:
        return
    path = folder / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config[SPARSITY_KEY] = record
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_pruned_dense(model: nn.Module, tokenizer: object, folder: Path, cfg: LlmcConfig) -> None:
    """A sparse-only run: the pruned float model as a plain transformers folder, plus the record."""
    record = sparsity_record(model, cfg)
    model.save_pretrained(folder, safe_serialization=True)
    add_sparsity_record(folder, record)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(folder)
