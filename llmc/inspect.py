"""`llmc inspect PATH`: what a saved checkpoint folder holds, read from its files alone.

The format comes from config.json's `quantization_config` (compressed-tensors with its
format name, AutoAWQ `awq`, `gptq`, another quant_method by name) or its absence (dense
float). Tensors are read from the safetensors headers (names, dtypes, shapes; no weights
are loaded). A module is quantized when it stores packed codes (`weight_packed`, `qweight`)
or an integer/FP8 `weight`. Its logical parameter count is `out x in` (from `weight_shape`
when stored, else the packed words x 32 / bits).

Theoretical size = quantized parameters x bits / 8 + every other tensor (scales, zero
points, g_idx, biases, embeddings, norms, unquantized linears) at its stored dtype.

Sparsity (`llmc.inspect_sparsity`) is the one part that reads weights: the zeros of every linear
layer and whether they are 2:4, in float and compressed-tensors folders.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from llmc.errors import LlmcError
from llmc.inspect_sparsity import (
    checkpoint_sparsity,
    declared_sparsity,
    format_sparsity,
    is_legacy_sparse,
    legacy_numel,
)
from llmc.sparsity import LayerSparsity

DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
LOW_BIT_WEIGHT_DTYPES = {"I8": 8, "U8": 8, "F8_E4M3": 8, "F8_E5M2": 8}
PACKED_NAMES = ("weight_packed", "qweight")


class CheckpointError(LlmcError):
    """The inspected path is not a readable checkpoint folder."""


@dataclass
class Tensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES.get(self.dtype, 4)


@dataclass
class CheckpointInfo:
    path: Path
    format: str
    """compressed-tensors (pack-quantized), awq, gptq, dense, or another quant_method."""
    weights: str
    """e.g. int4 g128 asymmetric; the dtype(s) for a dense checkpoint."""
    activations: str
    quantized: list[str] = field(default_factory=list)
    unquantized: list[str] = field(default_factory=list)
    bits: float | None = None
    params: int = 0
    quantized_params: int = 0
    disk_bytes: int = 0
    theoretical_bytes: int = 0
    sparsity: list[LayerSparsity] | None = None
    """Per linear layer, its zeros; None where not measured (awq, gptq)."""
    declared_sparsity: str | None = None

    @property
    def ratio(self) -> float:
        return self.disk_bytes / self.theoretical_bytes if self.theoretical_bytes else float("nan")


def read_tensors(folder: Path) -> list[Tensor]:
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} holds no .safetensors files; inspect reads safetensors checkpoints only")
    out = []
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    out.append(Tensor(name, sl.get_dtype(), tuple(sl.get_shape()), file))
        except Exception as exc:  # a corrupt or truncated file
            raise CheckpointError(f"{file} is not a readable safetensors file ({exc})") from None
    return out


def read_tensor_values(t: Tensor) -> list[int]:
    from safetensors import safe_open

    with safe_open(str(t.file), framework="pt") as f:
        return [int(v) for v in f.get_tensor(t.name).flatten().tolist()]


def load_config(folder: Path) -> dict:
    if not folder.exists():
        raise CheckpointError(f"{folder} does not exist; pass a checkpoint folder (the one with config.json)")
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is a file; pass the checkpoint folder that holds config.json")
    file = folder / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{folder} is not a checkpoint folder: it has no config.json")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file} is not valid JSON ({exc}); re-save the checkpoint") from None


def describe_scheme(qc: dict) -> tuple[str, str, str, float | None]:
    """(format, weights, activations, bits) from a quantization_config."""
    method = str(qc.get("quant_method", "unknown"))
    if method == "compressed-tensors":
        groups = list((qc.get("config_groups") or {}).values())
        g = groups[0] if groups else {}
        w, a = g.get("weights") or {}, g.get("input_activations")
        name = qc.get("format") or g.get("format") or "unknown"
        sparse = (qc.get("sparsity_config") or {}).get("format")
        if sparse and sparse != "dense":
            name = f"{name} + {sparse}" if groups else sparse
        fmt = f"compressed-tensors ({name})"
        if not groups:
            return fmt, "float (sparse only)", "none", None
        return fmt, describe_args(w), describe_args(a, act=True) if a else "none (weight-only)", w.get("num_bits")
    bits = qc.get("bits", qc.get("w_bit"))
    group = qc.get("group_size", qc.get("q_group_size"))
    if method == "awq":
        sym = not qc.get("zero_point", True)
        extra = f", {qc['version']}" if qc.get("version") else ""
    elif method == "gptq":
        sym = bool(qc.get("sym", True))
        extra = ", act-order" if qc.get("desc_act") else ""
    else:
        sym, extra = qc.get("sym", qc.get("symmetric")), ""
    parts = [f"int{bits}" if bits else "unknown bits"]
    parts.append(f"group {group}" if group not in (None, -1, 0) else "per channel")
    if sym is not None:
        parts.append("symmetric" if sym else "asymmetric")
    return method, ", ".join(parts) + extra, "none (weight-only)", bits


def describe_args(args: dict, act: bool = False) -> str:
    kind = args.get("type", "int")
    bits = args.get("num_bits")
    name = "fp8 e4m3" if kind == "float" and bits == 8 else f"{kind}{bits}"
    strategy = args.get("strategy")
    parts = [name, f"group {args['group_size']}" if strategy == "group" else f"per {strategy}"]
    parts.append("symmetric" if args.get("symmetric", True) else "asymmetric")
    if act:
        parts.append("dynamic" if args.get("dynamic") else "static")
    return ", ".join(parts)


def module_of(name: str) -> tuple[str, str]:
    module, _, leaf = name.rpartition(".")
    return module, leaf


def inspect_checkpoint(path: str | Path, sparsity: bool = True) -> CheckpointInfo:
    """What the folder holds; `sparsity=False` skips reading the weights (no zero counts)."""
    folder = Path(path).expanduser()
    config = load_config(folder)
    tensors = read_tensors(folder)
    qc = config.get("quantization_config")
    by_module: dict[str, dict[str, Tensor]] = defaultdict(dict)
    for t in tensors:
        module, leaf = module_of(t.name)
        by_module[module][leaf] = t
    if qc:
        fmt, weights, acts, bits = describe_scheme(qc)
    else:
        dtypes = sorted({t.dtype for t in tensors})
        fmt, weights, acts, bits = "dense", "float (" + ", ".join(dtypes) + ")", "none", None
    info = CheckpointInfo(folder, fmt, weights, acts, bits=bits)
    for module, leaves in sorted(by_module.items()):
        q = quantized_weight(leaves, bits) if qc else None
        if q is None:
            info.unquantized.append(module)
            info.theoretical_bytes += sum(t.nbytes for t in leaves.values())
            if is_legacy_sparse(leaves):  # values, bitmask and shape of one sparse weight
                info.params += legacy_numel(leaves) + sum(t.numel for n, t in leaves.items() if n == "bias")
                continue
            info.params += sum(t.numel for t in leaves.values() if t.dtype.startswith(("F", "BF")))
            continue
        code, logical, width = q
        info.quantized.append(module)
        info.quantized_params += logical
        info.params += logical + sum(t.numel for n, t in leaves.items() if n == "bias")
        info.theoretical_bytes += int(logical * width + 7) // 8
        info.theoretical_bytes += sum(t.nbytes for n, t in leaves.items() if n != code)
    info.disk_bytes = sum(f.stat().st_size for f in {t.file for t in tensors})
    info.sparsity = checkpoint_sparsity(qc, by_module) if sparsity else None
    info.declared_sparsity = declared_sparsity(config)
    return info


def quantized_weight(leaves: dict[str, Tensor], bits: float | None) -> tuple[str, int, float] | None:
    """(tensor name of the codes, logical parameter count, bits per parameter), or None if float."""
    for name in PACKED_NAMES:
        t = leaves.get(name)
        if t is None:
            continue
        width = float(bits or 4)
        shape = leaves.get("weight_shape")
        if shape is not None:
            dims = read_tensor_values(shape)
            return name, dims[0] * dims[1], width
        return name, int(t.numel * 32 / width), width
    c = leaves.get("compressed")
    if c is not None and c.dtype in LOW_BIT_WEIGHT_DTYPES and is_legacy_sparse(leaves):  # sparse 8-bit codes
        return "compressed", legacy_numel(leaves), float(LOW_BIT_WEIGHT_DTYPES[c.dtype])
    w = leaves.get("weight")
    if w is not None and w.dtype in LOW_BIT_WEIGHT_DTYPES and len(w.shape) == 2:
        return "weight", w.numel, float(LOW_BIT_WEIGHT_DTYPES[w.dtype])
    return None


def compact_names(names: list[str]) -> list[str]:
    """Collapse the block index: `model.layers.{0..29}.mlp.up_proj` for 30 names differing only there."""
    patterns: dict[str, list[int]] = defaultdict(list)
    for name in names:
        m = re.search(r"\.(\d+)\.", name)
        if m is None:
            patterns[name] = []
            continue
        patterns[name[: m.start()] + ".{}." + name[m.end():]].append(int(m.group(1)))
    out = []
    for pattern, ids in patterns.items():
        if not ids:
            out.append(pattern)
            continue
        lo, hi = min(ids), max(ids)
        if len(ids) == 1:
            span = str(lo)
        elif sorted(ids) == list(range(lo, hi + 1)):
            span = f"{{{lo}..{hi}}}"
        else:
            span = "{" + ",".join(map(str, sorted(ids))) + "}"
        out.append(pattern.replace("{}", span))
    return out


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def format_info(info: CheckpointInfo) -> str:
    q, u = info.quantized, info.unquantized
    other = info.params - info.quantized_params
    lines = [
        f"path           {info.path}",
        f"format         {info.format}",
        f"weights        {info.weights}",
        f"activations    {info.activations}",
        f"quantized      {len(q)} modules" + (": " + "; ".join(compact_names(q)) if q else ""),
        f"not quantized  {len(u)} modules" + (": " + "; ".join(compact_names(u)) if u else ""),
        f"parameters     {info.params:,} ({info.quantized_params:,} quantized, {other:,} other)",
        f"size on disk   {human_bytes(info.disk_bytes)} ({info.disk_bytes:,} bytes of safetensors)",
        f"theoretical    {human_bytes(info.theoretical_bytes)} ({info.theoretical_bytes:,} bytes); "
        f"disk / theoretical = {info.ratio:.3f}",
        *format_sparsity(info.sparsity, info.declared_sparsity),
    ]
    return "\n".join(lines)
