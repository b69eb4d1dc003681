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
import math
import os
import re
import stat
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from llmc.errors import LlmcError, ModelError
from llmc.inspect_sparsity import (
    checkpoint_sparsity,
    declared_sparsity,
    format_sparsity,
    is_legacy_sparse,
    legacy_numel,
    printable,
    small_ints,
)
from llmc.sparsity import LayerSparsity

DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
LOW_BIT_WEIGHT_DTYPES = {"I8": 8, "U8": 8, "F8_E4M3": 8, "F8_E5M2": 8}
PACKED_NAMES = ("weight_packed", "qweight")
MAX_JSON_BYTES = 16 * 2**20
"""config.json and index files larger than this are refused (real ones are a few KB to a few MB)."""
MAX_HEADER_BYTES = 100 * 2**20
"""A safetensors header (its JSON) larger than this is refused, as the safetensors library does."""
MAX_INT_DIGITS = 40
"""JSON integers longer than this are refused (no shape, size or setting needs them; huge ones are slow)."""
MAX_DIMS = 16


class CheckpointError(ModelError):
    """The inspected path is not a readable checkpoint folder."""


@dataclass
class Tensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

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


# ---------------------------------------------------------------- reading files, bounded

def file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a file")):
        if test(mode):
            return name
    return "not a regular file"


def reason(exc: BaseException) -> str:
    return printable(getattr(exc, "strerror", None) or str(exc) or type(exc).__name__)


def regular_size(path: Path, what: str, limit: int | None = None) -> int:
    """The size of `path` (symlinks followed); CheckpointError unless it is a regular file of at most `limit` bytes."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        dangling = os.path.islink(path)
        raise CheckpointError(f"{printable(path)} is {'a symlink to a missing file' if dangling else 'missing'}; "
                              f"{what}") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{printable(path)} cannot be read ({reason(exc)}); {what}") from None
    if not stat.S_ISREG(st.st_mode):
        link = " (through a symlink)" if os.path.islink(path) else ""
        raise CheckpointError(f"{printable(path)} is {file_kind(st.st_mode)}{link}, not a regular file; {what}")
    if limit is not None and st.st_size > limit:
        raise CheckpointError(f"{printable(path)} is {st.st_size:,} bytes, over the {limit:,} bytes inspect reads; "
                              f"{what}")
    return st.st_size


def read_regular(path: Path, what: str, limit: int, start: int = 0) -> bytes:
    """At most `limit` bytes of a regular file from `start`; opened non-blocking and checked again once open,
    so a FIFO or device swapped in after the check cannot block or stream forever."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{printable(path)} cannot be read ({reason(exc)}); {what}") from None
    with os.fdopen(fd, "rb") as f:
        try:
            mode = os.fstat(f.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise CheckpointError(f"{printable(path)} is {file_kind(mode)}, not a regular file; {what}")
            f.seek(start)
            return f.read(limit)
        except OSError as exc:
            raise CheckpointError(f"{printable(path)} cannot be read ({reason(exc)}); {what}") from None


def bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise CheckpointError(f"a JSON integer of {len(text):,} digits")
    return int(text)


def parse_json(data: bytes, file: Path, what: str) -> object:
    try:
        return json.loads(data.decode("utf-8-sig"), parse_int=bounded_int)
    except CheckpointError as exc:
        raise CheckpointError(f"{printable(file)} is not valid JSON for inspect ({exc}); {what}") from None
    except RecursionError:
        raise CheckpointError(f"{printable(file)} is not valid JSON for inspect (nested too deeply); {what}") from None
    except ValueError as exc:  # also UnicodeDecodeError
        raise CheckpointError(f"{printable(file)} is not valid JSON ({printable(exc)}); {what}") from None


def read_json(file: Path, what: str) -> object:
    regular_size(file, what, MAX_JSON_BYTES)
    data = read_regular(file, what, MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise CheckpointError(f"{printable(file)} is over the {MAX_JSON_BYTES:,} bytes inspect reads; {what}")
    return parse_json(data, file, what)


def json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"the number {printable(value)}"
    if isinstance(value, str):
        return f"the string {printable(repr(value))}"
    if isinstance(value, list):
        return "a list"
    return "an object" if isinstance(value, dict) else type(value).__name__


# ---------------------------------------------------------------- safetensors headers

def safetensors_header(file: Path, bad: Callable[[str], LlmcError], fix: str) -> tuple[dict, int]:
    """A safetensors file's JSON header (an object) and the size of its data section, from a bounded
    read of a regular file; `bad(why)` makes the error for a malformed file."""
    size = regular_size(file, fix)
    if size < 8:
        raise bad(f"{size} bytes, shorter than its 8-byte header length")
    n = int.from_bytes(read_regular(file, fix, 8), "little")
    if n > MAX_HEADER_BYTES:
        raise bad(f"a header of {n:,} bytes, over the {MAX_HEADER_BYTES:,} bytes inspect reads")
    if 8 + n > size:
        raise bad(f"a header of {n:,} bytes does not fit in a file of {size:,}: truncated")
    raw = read_regular(file, fix, n, start=8)
    if len(raw) != n:
        raise bad("the file shrank while reading")
    try:
        header = json.loads(raw.decode("utf-8"), parse_int=bounded_int)
    except (CheckpointError, RecursionError, ValueError) as exc:
        raise bad(f"its header is not valid JSON: {printable(exc) or 'nested too deeply'}") from None
    if not isinstance(header, dict):
        raise bad(f"its header is {json_kind(header)}, not an object")
    return header, size - 8 - n


def header_tensors(file: Path) -> list[Tensor]:
    """The tensors a safetensors file declares, from its header alone (read with a bounded read and checked
    against the file's size the way the safetensors library checks it)."""
    fix = "re-save or re-download the checkpoint"

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{printable(file)} is not a readable safetensors file ({why}); {fix}")

    header, data_len = safetensors_header(file, bad, fix)
    out = []
    for name, entry in header.items():
        if name == "__metadata__":
            if entry is not None and not (isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())):
                raise bad("its __metadata__ is not an object of strings")
            continue
        where = f"tensor {printable(repr(name))}"
        if not isinstance(entry, dict):
            raise bad(f"{where} is {json_kind(entry)}, not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or not dtype:
            raise bad(f"{where} has dtype {json_kind(dtype)}")
        if not (isinstance(shape, list) and len(shape) <= MAX_DIMS
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise bad(f"{where} has shape {printable(shape)}, not a list of sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_len):
            raise bad(f"{where} has data_offsets {printable(offsets)} outside the {data_len:,} bytes of data")
        t = Tensor(name, dtype, tuple(shape), file)
        if dtype in DTYPE_BYTES and offsets[1] - offsets[0] != t.nbytes:
            raise bad(f"{where} {dtype}{list(shape)} needs {t.nbytes:,} bytes, its offsets span "
                      f"{offsets[1] - offsets[0]:,}")
        out.append(t)
    return out


def read_tensors(folder: Path) -> list[Tensor]:
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{printable(folder)} holds no .safetensors files; inspect reads safetensors "
                              "checkpoints only")
    check_indexes(folder, files)
    out = []
    for file in files:
        tensors = header_tensors(file)
        try:  # the library's own checks (the values are read through it for the sparsity)
            with safe_open(str(file), framework="pt") as f:
                names = set(f.keys())
        except Exception as exc:  # a corrupt file the header checks above let through
            raise CheckpointError(f"{printable(file)} is not a readable safetensors file ({printable(exc)}); "
                                  "re-save or re-download the checkpoint") from None
        if names != {t.name for t in tensors}:
            raise CheckpointError(f"{printable(file)} is not a readable safetensors file (its tensors are read "
                                  "differently by the safetensors library); re-save or re-download the checkpoint")
        out += tensors
    return out


def check_indexes(folder: Path, files: list[Path]) -> None:
    """Every `*.safetensors.index.json` of the folder maps tensor names to shard files of this folder that exist."""
    present = {f.name for f in files}
    for index in sorted(folder.glob("*.safetensors.index.json")):
        fix = "fix the index or re-save the checkpoint"
        data = read_json(index, fix)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            what = json_kind(data) if not isinstance(data, dict) else f"weight_map {json_kind(weight_map)}"
            raise CheckpointError(f"{printable(index)} is not a safetensors index (it holds {what}, not a "
                                  f"weight_map object of tensor name -> shard file); {fix}")
        for tensor, shard in weight_map.items():
            if not isinstance(shard, str):
                raise CheckpointError(f"{printable(index)} maps {printable(repr(tensor))} to {json_kind(shard)}, "
                                      f"not a shard file name; {fix}")
            if shard in ("", ".", "..") or "/" in shard or "\\" in shard or "\0" in shard:
                raise CheckpointError(f"{printable(index)} names shard {printable(repr(shard))}, outside the "
                                      f"checkpoint folder; shards must be files of the folder itself; {fix}")
            if shard not in present:
                what = "which is missing" if not (folder / shard).exists() else "which is not a .safetensors file"
                raise CheckpointError(f"{printable(index)} names shard {printable(repr(shard))} {what}; "
                                      "re-download the missing shard or " + fix)


# ---------------------------------------------------------------- config.json

def load_config(folder: Path) -> dict:
    try:
        st = os.stat(folder)
    except FileNotFoundError:
        raise CheckpointError(f"{printable(folder)} does not exist; pass a checkpoint folder (the one with "
                              "config.json)") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{printable(folder)} cannot be read ({reason(exc)}); pass a checkpoint folder "
                              "(the one with config.json)") from None
    if not stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"{printable(folder)} is {file_kind(st.st_mode)}; pass the checkpoint folder that "
                              "holds config.json")
    file = folder / "config.json"
    if not os.path.lexists(file):
        raise CheckpointError(f"{printable(folder)} is not a checkpoint folder: it has no config.json")
    config = read_json(file, "re-save the checkpoint")
    if not isinstance(config, dict):
        raise CheckpointError(f"{printable(file)} holds {json_kind(config)}, not a JSON object; re-save the "
                              "checkpoint")
    for key in ("quantization_config", "llmc_sparsity"):
        obj(config.get(key), key)
    return config


def obj(value: object, where: str) -> dict:
    """A JSON object of the config ({} for null); CheckpointError for any other type."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CheckpointError(f"config.json's {where} is {json_kind(value)}, not an object; re-save the checkpoint")
    return value


def opt_str(d: dict, key: str, where: str) -> str | None:
    v = d.get(key)
    if v is None or isinstance(v, str):
        return v
    raise CheckpointError(f"config.json's {where}.{key} is {json_kind(v)}, not a string; re-save the checkpoint")


def opt_int(d: dict, key: str, where: str, lo: int, hi: int) -> int | None:
    v = d.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise CheckpointError(f"config.json's {where}.{key} is {json_kind(v)}, not a whole number from {lo} to {hi}; "
                              "re-save the checkpoint")
    return v


MAX_BITS = 32
MAX_GROUP = 2**31


def describe_scheme(qc: dict) -> tuple[str, str, str, float | None]:
    """(format, weights, activations, bits) from a quantization_config."""
    w_ = "quantization_config"
    method = opt_str(qc, "quant_method", w_) or "unknown"
    if method == "compressed-tensors":
        groups_obj = obj(qc.get("config_groups"), f"{w_}.config_groups")
        groups = [(f"{w_}.config_groups.{printable(k)}", obj(g, f"{w_}.config_groups.{printable(k)}"))
                  for k, g in groups_obj.items()]
        gw, g = groups[0] if groups else (w_, {})
        w = obj(g.get("weights"), f"{gw}.weights")
        a = g.get("input_activations")
        a = obj(a, f"{gw}.input_activations") if a is not None else None
        name = opt_str(qc, "format", w_) or opt_str(g, "format", gw) or "unknown"
        sparse = opt_str(obj(qc.get("sparsity_config"), f"{w_}.sparsity_config"), "format", f"{w_}.sparsity_config")
        if sparse and sparse != "dense":
            name = f"{name} + {sparse}" if groups else sparse
        fmt = f"compressed-tensors ({printable(name)})"
        if not groups:
            return fmt, "float (sparse only)", "none", None
        weights = describe_args(w, f"{gw}.weights")
        acts = describe_args(a, f"{gw}.input_activations", act=True) if a else "none (weight-only)"
        return fmt, weights, acts, opt_int(w, "num_bits", f"{gw}.weights", 1, MAX_BITS)
    bits_key = "bits" if qc.get("bits") is not None else "w_bit"
    bits = opt_int(qc, bits_key, w_, 1, MAX_BITS)
    group_key = "group_size" if qc.get("group_size") is not None else "q_group_size"
    group = opt_int(qc, group_key, w_, -1, MAX_GROUP)
    if method == "awq":
        sym = not qc.get("zero_point", True)
        version = opt_str(qc, "version", w_)
        extra = f", {printable(version)}" if version else ""
    elif method == "gptq":
        sym = bool(qc.get("sym", True))
        extra = ", act-order" if qc.get("desc_act") else ""
    else:
        sym, extra = qc.get("sym", qc.get("symmetric")), ""
    parts = [f"int{bits}" if bits else "unknown bits"]
    parts.append(f"group {group}" if group not in (None, -1, 0) else "per channel")
    if sym is not None:
        parts.append("symmetric" if sym else "asymmetric")
    return printable(method), ", ".join(parts) + extra, "none (weight-only)", bits


def describe_args(args: dict, where: str, act: bool = False) -> str:
    kind = opt_str(args, "type", where) or "int"
    bits = opt_int(args, "num_bits", where, 1, MAX_BITS)
    name = "fp8 e4m3" if kind == "float" and bits == 8 else f"{printable(kind)}{bits}"
    strategy = opt_str(args, "strategy", where)
    group = opt_int(args, "group_size", where, -1, MAX_GROUP)
    parts = [name, f"group {group}" if strategy == "group" else f"per {printable(strategy)}"]
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
        fmt, weights, acts, bits = "dense", "float (" + ", ".join(map(printable, dtypes)) + ")", "none", None
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
            dims = small_ints(shape, 2, exact=True)
            if dims[0] * dims[1] * width > t.nbytes * 8:  # more weights than the packed words hold
                raise CheckpointError(f"{printable(shape.name)} in {printable(shape.file)} is {dims}, more weights "
                                      f"than {printable(t.name)} {list(t.shape)} holds at {width:g} bits; re-save "
                                      "the checkpoint")
            return name, dims[0] * dims[1], width
        return name, int(t.nbytes * 8 / width), width  # int32 words (GPTQ, pack-quantized) or bytes (FP4, MX)
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
    q, u = [printable(n) for n in info.quantized], [printable(n) for n in info.unquantized]
    other = info.params - info.quantized_params
    lines = [
        f"path           {printable(info.path)}",
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
