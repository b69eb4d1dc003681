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

from llmc.errors import LlmcError
from llmc.sparsity import LayerSparsity, measure, total

if TYPE_CHECKING:
    from llmc.inspect import Tensor as TensorInfo

FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
INT_DTYPES = {"I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64"}
LEGACY_SPARSE = ("compressed", "bitmask", "shape")


def printable(value: object, limit: int = 200) -> str:
    """`value` as one line of text that any terminal encoding prints: control characters, lone surrogates
    and other unprintables escaped, cut to `limit` characters."""
    text = str(value)
    if not text.isprintable():
        text = "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                       for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def checkpoint_error(message: str) -> LlmcError:
    from llmc.inspect import CheckpointError  # here, not at the top: llmc.inspect imports this module

    return CheckpointError(message)


def load(t: TensorInfo) -> torch.Tensor:
    from safetensors import safe_open

    try:
        with safe_open(str(t.file), framework="pt") as f:
            return f.get_tensor(t.name)
    except Exception as exc:  # a file changed since its header was read, a dtype torch lacks, ...
        raise checkpoint_error(f"{printable(t.name)} of {printable(t.file)} cannot be read ({printable(exc)}); "
                               "re-save or re-download the checkpoint") from None


def small_ints(t: TensorInfo, most: int, exact: bool = False) -> list[int]:
    """The values of a small integer tensor that stores a shape (`weight_shape`, a legacy `shape`): at most
    `most` (exactly `most` with `exact`) values, none negative; checked before anything is read."""
    fix = "re-save the checkpoint"
    count = math.prod(t.shape)
    if t.dtype not in INT_DTYPES or (count != most if exact else count > most):
        need = f"{'exactly' if exact else 'at most'} {most} integers"
        raise checkpoint_error(f"{printable(t.name)} of {printable(t.file)} is {printable(t.dtype)}{list(t.shape)}, "
                               f"not a shape ({need}); {fix}")
    values = [int(v) for v in load(t).flatten().tolist()]
    if any(v < 0 for v in values):
        raise checkpoint_error(f"{printable(t.name)} of {printable(t.file)} is {values}, a negative size; {fix}")
    return values


def is_embedding(module: str) -> bool:
    leaf = module.rpartition(".")[2]
    return "embed" in leaf or leaf in ("wte", "wpe")


def is_legacy_sparse(leaves: dict[str, TensorInfo]) -> bool:
    return all(k in leaves for k in LEGACY_SPARSE)


def legacy_numel(leaves: dict[str, TensorInfo]) -> int:
    return math.prod(small_ints(leaves["shape"], 8))


def expand_legacy(leaves: dict[str, TensorInfo]) -> torch.Tensor:
    """The dense `[out, in]` stored values of a sparse-bitmask / sparse-24-bitmask linear (codes if quantized)."""
    from compressed_tensors.utils import unpack_bitmasks

    shape = small_ints(leaves["shape"], 2, exact=True)
    bitmask, compressed = leaves["bitmask"], leaves["compressed"]
    if list(bitmask.shape) != [shape[0], -(-shape[1] // 8)] or bitmask.dtype not in ("U8", "I8", "BOOL"):
        raise checkpoint_error(f"{printable(bitmask.name)} of {printable(bitmask.file)} is "
                               f"{printable(bitmask.dtype)}{list(bitmask.shape)}, not the packed bitmask of a "
                               f"{shape} weight; re-save the checkpoint")
    values = load(compressed).flatten()
    values = values.float() if values.dtype == torch.float8_e4m3fn else values
    mask = unpack_bitmasks(load(bitmask), shape)
    if int(mask.sum()) != values.numel():
        raise checkpoint_error(f"{printable(compressed.name)} of {printable(compressed.file)} holds {values.numel():,} "
                               f"values, its bitmask {int(mask.sum()):,}; re-save the checkpoint")
    dense = torch.zeros(shape, dtype=values.dtype)
    dense[mask] = values
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
    except LlmcError:  # a corrupt file: reported
        raise
    except Exception:  # a format or layout the library cannot decompress (it raises any kind of error)
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
            if not plausible_quantized(leaves):
                raise NotImplementedError(f"{module}: scales that do not fit the weight")
            local = {k: load(t) for k, t in leaves.items()}
            out.append(measure(module, compressor.decompress(local, scheme)["weight"]))
        elif "weight" in leaves and leaves["weight"].dtype in FLOAT_DTYPES and len(leaves["weight"].shape) == 2:
            if not is_embedding(module):
                out.append(measure(module, load(leaves["weight"])))
    return out


def plausible_quantized(leaves: dict[str, TensorInfo]) -> bool:
    """The scales, zero points and g_idx of a quantized linear are no larger than its weight, and the scales' rows
    are one or the weight's rows: decompressing cannot broadcast them into a tensor much larger than the weight."""
    weight = leaves.get("weight")
    if "weight_shape" in leaves:
        out_in = small_ints(leaves["weight_shape"], 2, exact=True)
    elif weight is not None and len(weight.shape) == 2:
        out_in = list(weight.shape)
    else:
        return False
    numel = out_in[0] * out_in[1]
    for name, t in leaves.items():
        if name in ("weight", "weight_packed", "weight_shape"):
            continue
        if len(t.shape) > 2 or math.prod(t.shape) > numel + out_in[0]:
            return False
        if name == "weight_scale" and len(t.shape) == 2 and t.shape[0] not in (1, out_in[0]):
            return False
    return True


def declared_sparsity(config: dict) -> str | None:
    """The sparsity a folder declares: llmc's `llmc_sparsity` record or compressed-tensors' `sparsity_config`."""
    qc = config.get("quantization_config")
    qc = qc if isinstance(qc, dict) else {}
    for source, entry in (("llmc_sparsity", config.get("llmc_sparsity")), ("sparsity_config", qc.get("sparsity_config"))):
        if entry and isinstance(entry, dict):
            share = entry.get("global_sparsity")
            ok = isinstance(share, int | float) and not isinstance(share, bool) and math.isfinite(share) \
                and abs(share) <= 1e6
            share = f", {share:.1%} zeros" if ok else ""
            structure = printable(entry.get("sparsity_structure", "unstructured"), 60)
            return f"{structure} ({printable(entry.get('format', '?'), 60)}{share}; {source})"
    return None


def format_sparsity(layers: list[LayerSparsity] | None, declared: str | None) -> list[str]:
    if layers is None:
        return ["sparsity       not measured (--no-sparsity, or a layout other than compressed-tensors and float)"]
    zeros, numel, n24 = total(layers)
    share = zeros / numel if numel else 0.0
    head = (f"sparsity       {share:.2%} zeros over {len(layers)} linear layers ({zeros:,} of {numel:,} weights); "
            f"{n24} of {len(layers)} are 2:4")
    lines = [head + (f"; declared {declared}" if declared else "")]
    names = [printable(s.name) for s in layers]
    width = max((len(n) for n in names), default=0)
    lines += [f"  {n:<{width}}  {s.fraction:7.2%}  {'2:4' if s.two_four else '-'}" for n, s in zip(names, layers)]
    return lines
