"""The sparsity part of `llmc inspect`: zeros of every linear layer of a saved folder, read from its weights.

Each linear's weight is rebuilt as the model would use it, then measured with `llmc.sparsity`:

* a float `weight` `[out, in]` (plain transformers folders, `save_trans`, `save_fake`, llmc's
  sparse-only export, linears a quantized checkpoint keeps in float) is read as it is;
  embeddings (`*embed*`, `wte`, `wpe`) are not linears and are skipped;
* a compressed-tensors quantized linear (`pack-quantized`, `int-quantized`, `float-quantized`) is
  decompressed by compressed-tensors' own compressor of the checkpoint's format, so a zero is a
  weight that dequantizes to exactly 0;
* a legacy sparse compressed-tensors linear (`sparse-bitmask`, `sparse-24-bitmask`, as older
  compressed-tensors and llm-compressor wrote them: `compressed` values, packed `bitmask`,
  `shape`) is expanded with the library's `unpack_bitmasks`; with quantization only the
  symmetric int8/FP8 codes compose with it there, and a zero code is a zero weight.

AutoAWQ and GPTQ layouts, and compressed-tensors folders with several config groups or a format the
library cannot decompress, are not measured (`None`).
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

import torch

from llmc.sparsity import LayerSparsity, measure, total

if TYPE_CHECKING:
    from llmc.inspect import Tensor as TensorInfo

FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
LEGACY_SPARSE = ("compressed", "bitmask", "shape")


def load(t: TensorInfo) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(t.file), framework="pt") as f:
        return f.get_tensor(t.name)


def is_embedding(module: str) -> bool:
    leaf = module.rpartition(".")[2]
    return "embed" in leaf or leaf in ("wte", "wpe")


def is_legacy_sparse(leaves: dict[str, TensorInfo]) -> bool:
    return all(k in leaves for k in LEGACY_SPARSE)


def legacy_numel(leaves: dict[str, TensorInfo]) -> int:
    return math.prod(int(v) for v in load(leaves["shape"]).flatten().tolist())


def expand_legacy(leaves: dict[str, TensorInfo]) -> torch.Tensor:
    """The dense `[out, in]` stored values of a sparse-bitmask / sparse-24-bitmask linear (codes if quantized)."""
    from compressed_tensors.utils import unpack_bitmasks

    shape = [int(v) for v in load(leaves["shape"]).flatten().tolist()]
    values = load(leaves["compressed"]).flatten()
    values = values.float() if values.dtype == torch.float8_e4m3fn else values
    dense = torch.zeros(shape, dtype=values.dtype)
    dense[unpack_bitmasks(load(leaves["bitmask"]), shape)] = values
    return dense


def quant_scheme(qc: dict):
    """(compressor, scheme) of the checkpoint's quantized linears, or None without quantization."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    groups = list((qc.get("config_groups") or {}).values())
    if not groups:
        return None
    if len(groups) > 1:
        raise NotImplementedError("several config groups: which linear has which scheme is not read here")
    scheme = QuantizationScheme.model_validate(groups[0])
    fmt = scheme.format or qc.get("format")
    return BaseCompressor.get_value_from_registry(fmt), scheme


def checkpoint_sparsity(qc: dict | None, by_module: dict[str, dict[str, TensorInfo]]) -> list[LayerSparsity] | None:
    """Per linear layer of the folder, its zeros; None for layouts not measured (awq, gptq, ...)."""
    method = (qc or {}).get("quant_method")
    if qc and method != "compressed-tensors":
        return None
    try:
        return measure_modules(quant_scheme(qc) if qc else None, by_module)
    except (ValueError, KeyError, RuntimeError, NotImplementedError):  # a format the library cannot decompress
        return None


def natural(name: str) -> list:
    """Sort key: model.layers.2 before model.layers.10."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name)]


def measure_modules(quant, by_module: dict[str, dict[str, TensorInfo]]) -> list[LayerSparsity]:
    out = []
    for module, leaves in sorted(by_module.items(), key=lambda item: natural(item[0])):
        if is_legacy_sparse(leaves):
            out.append(measure(module, expand_legacy(leaves)))
        elif quant is not None and "weight_scale" in leaves:
            compressor, scheme = quant
            local = {k: load(t) for k, t in leaves.items()}
            out.append(measure(module, compressor.decompress(local, scheme)["weight"]))
        elif "weight" in leaves and leaves["weight"].dtype in FLOAT_DTYPES and len(leaves["weight"].shape) == 2:
            if not is_embedding(module):
                out.append(measure(module, load(leaves["weight"])))
    return out


def declared_sparsity(config: dict) -> str | None:
    """The sparsity a folder declares: llmc's `llmc_sparsity` record or compressed-tensors' `sparsity_config`."""
    qc = config.get("quantization_config") or {}
    for source, entry in (("llmc_sparsity", config.get("llmc_sparsity")), ("sparsity_config", qc.get("sparsity_config"))):
        if entry:
            share = entry.get("global_sparsity")
            share = f", {share:.1%} zeros" if isinstance(share, int | float) else ""
            return f"{entry.get('sparsity_structure', 'unstructured')} ({entry.get('format', '?')}{share}; {source})"
    return None


def format_sparsity(layers: list[LayerSparsity] | None, declared: str | None) -> list[str]:
    if layers is None:
        return ["sparsity       not measured (--no-sparsity, or a layout other than compressed-tensors and float)"]
    zeros, numel, n24 = total(layers)
    share = zeros / numel if numel else 0.0
    head = (f"sparsity       {share:.2%} zeros over {len(layers)} linear layers ({zeros:,} of {numel:,} weights); "
            f"{n24} of {len(layers)} are 2:4")
    lines = [head + (f"; declared {declared}" if declared else "")]
    width = max((len(s.name) for s in layers), default=0)
    lines += [f"  {s.name:<{width}}  {s.fraction:7.2%}  {'2:4' if s.two_four else '-'}" for s in layers]
    return lines
