"""Load a HF causal LM (folder, hub id or GGUF) with its tokenizer and adapter."""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llmc.config.schema import ModelSection
from llmc.errors import ModelError
from llmc.inspect import safetensors_header
from llmc.models.adapter import ModelAdapter
from llmc.models.convert import find_converter, load_tokenizer, remote_code_error
from llmc.models.registry import get_adapter

log = logging.getLogger("llmc")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    adapter: ModelAdapter


def expand(path: str) -> str:
    return os.path.expandvars(os.path.expanduser(path))


def _looks_local(path: str) -> bool:
    """A path the user meant as a local folder (a hub id is `name` or `org/name`)."""
    return path.startswith(("/", ".", "~", "$")) or path.count("/") > 1 or os.path.exists(expand(path))


def check_model_paths(cfg: ModelSection) -> None:
    """Fail before any heavy work if a local model path, GGUF file or tokenizer folder is missing or
    of the wrong kind, or if the weight files are corrupt (headers only) or pickled (unless
    `model.allow_pickle`)."""
    path = expand(cfg.path)
    local = _looks_local(cfg.path)
    fetch = " (run `make setup` or `llmc fetch` to get the quickstart model)" if "llmc" in cfg.path else ""
    if local and os.path.isfile(path):
        hint = (f"; for a GGUF file set model.path: {os.path.dirname(cfg.path) or '.'} and model.gguf_file: "
                f"{os.path.basename(cfg.path)}" if path.lower().endswith(".gguf") else "")
        raise ModelError(f"model.path {cfg.path} is a file, not a folder; set model.path to a HF model folder{hint}")
    if local and not os.path.isdir(path):
        raise ModelError(f"model path {cfg.path} not found; set model.path to a HF model folder{fetch}")
    if cfg.gguf_file and local:
        gguf_path = os.path.join(path, cfg.gguf_file)
        if os.path.isdir(gguf_path):
            raise ModelError(
                f"model.gguf_file {cfg.gguf_file} in {cfg.path} is a folder, not a file; "
                f"set model.gguf_file to the .gguf file's name"
            )
        if not os.path.isfile(gguf_path):
            raise ModelError(
                f"GGUF file {cfg.gguf_file} not found in {cfg.path}; set model.gguf_file to a file in that folder"
                + fetch
            )
    if cfg.tokenizer_path:
        tok = expand(cfg.tokenizer_path)
        if os.path.isfile(tok):
            raise ModelError(
                f"model.tokenizer_path {cfg.tokenizer_path} is a file, not a folder; set model.tokenizer_path to "
                f"the folder holding the tokenizer files (or leave it unset to use model.path)"
            )
        if not os.path.exists(tok) and (local or _looks_local(cfg.tokenizer_path)):
            raise ModelError(f"tokenizer path {cfg.tokenizer_path} not found; set model.tokenizer_path to a folder")
    if local:
        check_weight_files(cfg)


PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")
# Bits per element of every safetensors dtype (sub-byte float formats included).
SAFETENSORS_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64,
    "F64": 64, "C64": 64,
}


def check_weight_files(cfg: ModelSection) -> None:
    """The local checkpoint's weights: a GGUF (`model.gguf_file`) must read as GGUF; safetensors
    files must have a sound header; pickled weights alone are refused unless `model.allow_pickle`."""
    folder = expand(cfg.path)
    if cfg.gguf_file:
        where = os.path.join(cfg.path, cfg.gguf_file)
        check_gguf(os.path.join(folder, cfg.gguf_file), f"GGUF file {where} (model.gguf_file)")
        return
    for file in safetensors_files(folder):
        check_safetensors(file)
    if glob.glob(os.path.join(folder, "*.safetensors")):
        return
    pickled = sorted({os.path.basename(f) for p in PICKLE_PATTERNS for f in glob.glob(os.path.join(folder, p))})
    # A converted layout (llmc.models.convert) is read by llmc itself with torch.load(weights_only=True),
    # which builds only tensors and plain containers: no checkpoint code runs there.
    if pickled and not cfg.allow_pickle and find_converter(cfg) is None:
        raise ModelError(
            f"{cfg.path} holds only pickled weights ({pickled[0]}), which can run code when loaded; llmc loads "
            f"safetensors or GGUF by default: convert the checkpoint to safetensors, or set model.allow_pickle: "
            f"true if you trust its source"
        )


def safetensors_files(folder: str) -> list[str]:
    """The safetensors files transformers reads from `folder`: the shards of the index, else
    model.safetensors, else every top-level *.safetensors."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelError(
                f"{index} is not a valid safetensors index ({_first_line(exc)}); re-download the checkpoint"
            ) from None
        for shard in shards:
            if not isinstance(shard, str) or not os.path.isfile(os.path.join(folder, shard)):
                raise ModelError(
                    f"shard {shard} listed in {index} is missing; re-download the checkpoint's safetensors files"
                )
        return [os.path.join(folder, s) for s in shards]
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    return sorted(glob.glob(os.path.join(folder, "*.safetensors")))


_CHECKED: set[tuple[str, int, int]] = set()
"""Files already found sound, by (path, size, mtime): `check_model_paths` runs before and in `load_model`."""


def _once(path: str, check) -> None:
    """Run `check()` on `path` unless the same file (path, size, mtime) passed it before."""
    try:
        st = os.stat(path)
        key: tuple[str, int, int] | None = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    except OSError:
        key = None
    if key in _CHECKED:
        return
    check()
    if key is not None:
        _CHECKED.add(key)


def check_safetensors(path: str) -> None:
    _once(path, lambda: _check_safetensors(path))


def _check_safetensors(path: str) -> None:
    """Refuse a truncated or corrupt safetensors file from its header alone: an 8-byte little-endian
    header length, a JSON header, and tensors that tile the data section exactly."""
    def bad(problem: str) -> ModelError:
        return ModelError(
            f"safetensors file {path} is corrupt or truncated ({problem}); re-download or re-export the checkpoint"
        )

    header, data_size = safetensors_header(Path(path), bad, "re-download or re-export the checkpoint")
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise bad("__metadata__ is not a mapping of strings")
            continue
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"entry {name!r} is not a tensor description")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        bits = SAFETENSORS_BITS.get(dtype) if isinstance(dtype, str) else None
        ints = isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in [*shape, *offsets])
        if bits is None or not ints:
            raise bad(f"tensor {name!r} has an invalid dtype, shape or offsets")
        begin, end = offsets
        nbits = math.prod(shape) * bits
        if end < begin or nbits % 8 or end - begin != nbits // 8:
            raise bad(f"tensor {name!r} takes {end - begin} bytes, its dtype and shape need {nbits / 8:g}")
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise bad(f"tensor {name!r} starts at byte {begin}, expected {position}")
        position = end
    if position != data_size:
        problem = "data cut short" if position > data_size else "extra bytes after the last tensor"
        raise bad(f"{problem}: the tensors need {position} bytes of data, the file holds {data_size}")


def check_gguf(path: str, what: str) -> None:
    """Refuse a file that is not GGUF or whose header and tensor table gguf cannot read (e.g. truncated)."""
    _once(path, lambda: _check_gguf(path, what))


def _check_gguf(path: str, what: str) -> None:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelError(f"cannot read {what} ({_first_line(exc)}); check the file's permissions") from None
    if magic != b"GGUF":
        raise ModelError(
            f"{what} is not a GGUF file (it does not start with the GGUF magic); set model.gguf_file to a .gguf "
            f"checkpoint, or re-download it"
        )
    try:
        read_gguf_header(path)
    except Exception as exc:  # noqa: BLE001 - struct.error, ValueError, KeyError, UnicodeDecodeError, mmap errors...
        detail = "the header is cut short" if isinstance(exc, struct.error) else _first_line(exc)
        raise ModelError(f"{what} is corrupt or truncated ({detail}); re-download the GGUF file") from None


_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_header(path: str) -> dict[str, tuple[int, int]]:
    """Parse a GGUF file's header, metadata and tensor table (the layout gguf's GGUFReader and
    transformers read) without touching the tensor data; check that every tensor lies within the
    file. Returns {tensor name: (offset, bytes)}. Raises ValueError (or struct.error) when corrupt.

    Much faster than `gguf.GGUFReader`, which turns every tokenizer entry into a numpy view."""
    import mmap

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        size = len(buf)
        order = "<"
        (version,) = struct.unpack_from("<I", buf, 4)
        if version & 0xFFFF == 0:  # a big-endian file
            order = ">"
            (version,) = struct.unpack_from(">I", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not 2 or 3")
        pos = 8

        def take(fmt: str) -> tuple:
            nonlocal pos
            values = struct.unpack_from(order + fmt, buf, pos)
            pos += struct.calcsize(order + fmt)
            return values

        def string() -> str:
            nonlocal pos
            (length,) = take("Q")
            if pos + length > size:
                raise ValueError(f"a string of {length} bytes runs past the end of the file")
            text = bytes(buf[pos:pos + length]).decode("utf-8")
            pos += length
            return text

        def value(kind: int):
            nonlocal pos
            if kind in _GGUF_SCALARS:
                return take(_GGUF_SCALARS[kind])[0]
            if kind == _GGUF_STRING:
                return string()
            if kind == _GGUF_ARRAY:
                (item, count) = take("IQ")
                if count > size - pos:
                    raise ValueError(f"an array of {count} entries cannot fit in the file")
                if item in _GGUF_SCALARS:
                    width = struct.calcsize(order + _GGUF_SCALARS[item])
                    if pos + count * width > size:
                        raise ValueError("an array runs past the end of the file")
                    pos += count * width
                    return None
                for _ in range(count):
                    value(item)
                return None
            raise ValueError(f"unknown metadata value type {kind}")

        n_tensors, n_kv = take("QQ")
        if n_tensors > size or n_kv > size:
            raise ValueError(f"{n_tensors} tensors and {n_kv} metadata entries cannot fit in {size} bytes")
        alignment = 32
        for _ in range(n_kv):
            key = string()
            (kind,) = take("I")
            got = value(kind)
            if key == "general.alignment":
                if not isinstance(got, int) or got <= 0 or got & (got - 1):
                    raise ValueError(f"general.alignment {got!r} is not a power of two")
                alignment = got
        tensors = []
        for _ in range(n_tensors):
            name = string()
            (n_dims,) = take("I")
            if n_dims > 8:
                raise ValueError(f"tensor {name} has {n_dims} dimensions")
            dims = take("Q" * n_dims)
            kind, offset = take("IQ")
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            n = math.prod(dims)
            if n % block:
                raise ValueError(f"tensor {name} has {n} values, not a multiple of its block of {block}")
            tensors.append((name, offset, n // block * type_size))
        data_start = -(-pos // alignment) * alignment
        result = {}
        for name, offset, nbytes in tensors:
            if data_start + offset + nbytes > size:
                raise ValueError(f"tensor {name} runs past the end of the file (the data is cut short)")
            result[name] = (offset, nbytes)
        return result


def warn_remote_code(cfg: ModelSection) -> None:
    """`model.trust_remote_code: true` runs the checkpoint's Python files: say which, once."""
    folder = expand(cfg.path)
    if os.path.isdir(folder):
        files = sorted(os.path.relpath(f, folder) for f in glob.glob(os.path.join(folder, "**", "*.py"),
                                                                       recursive=True))
        what = f"the Python files of {cfg.path}: {', '.join(files)}" if files else (
            f"any Python code the config of {cfg.path} points to (no .py files in the folder)")
    else:
        what = f"Python code from the hub repository {cfg.path}"
    log.warning("model.trust_remote_code is true: transformers will run %s; only do this for a source you trust",
                what)


def resolve_adapter(cfg: ModelSection) -> ModelAdapter:
    """Read only the model's config to pick the adapter (fails fast on unsupported architectures)."""
    from transformers import AutoConfig

    if find_converter(cfg) is not None:  # remote-code layout converted to Llama on load (llmc/models/convert)
        return get_adapter(cfg.type, "llama")
    kwargs = _common_kwargs(cfg)
    try:
        hf_config = AutoConfig.from_pretrained(expand(cfg.path), **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        if (remote := remote_code_error(cfg)) is not None:
            raise remote from None
        raise ModelError(
            f"cannot read the model config at {cfg.path} ({_first_line(exc)}); "
            f"point model.path at a HF model folder with config.json (or a GGUF via model.gguf_file)"
        ) from None
    return get_adapter(cfg.type, getattr(hf_config, "model_type", None))


def load_model(cfg: ModelSection) -> LoadedModel:
    import transformers
    from transformers import AutoTokenizer

    check_model_paths(cfg)
    converter = find_converter(cfg)
    if cfg.trust_remote_code and converter is None:
        warn_remote_code(cfg)
    adapter = resolve_adapter(cfg)
    kwargs = _common_kwargs(cfg)
    load_kwargs = {} if cfg.gguf_file or cfg.allow_pickle else {"use_safetensors": True}
    dtype = DTYPES.get(cfg.torch_dtype, "auto")
    if cfg.gguf_file and dtype == "auto":
        dtype = torch.float32
    try:
        auto = getattr(transformers, adapter.auto_class)  # AutoModelForCausalLM but for multi-modal families
        if cfg.stream:  # meta model, blocks read one at a time (llmc.pipeline.streaming)
            from llmc.pipeline.streaming import empty_model

            model = empty_model(expand(cfg.path), auto, dtype, adapter, **kwargs)
        else:
            model = converter.load(cfg) if converter else auto.from_pretrained(
                expand(cfg.path), dtype=dtype, **kwargs, **load_kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"cannot load the model at {cfg.path} ({_first_line(exc)}); check model.path") from None
    if cfg.gguf_file:
        forget_gguf_origin(model)
    model.eval()
    model.requires_grad_(False)
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False
    if adapter.prepare is not None:
        adapter.prepare(model)
    adapter.check(model)
    tok_path = expand(cfg.tokenizer_path or cfg.path)
    tok_kwargs = dict(kwargs)
    if cfg.tokenizer_path and cfg.tokenizer_path != cfg.path:
        tok_kwargs.pop("gguf_file", None)
    try:
        tokenizer = load_tokenizer(cfg) if converter else AutoTokenizer.from_pretrained(  # converted: no remote code
            tok_path, use_fast=cfg.tokenizer_mode == "fast", **tok_kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"cannot load the tokenizer at {tok_path} ({_first_line(exc)}); set model.tokenizer_path"
        ) from None
    log.info("loaded %s (%s, %s, %.1fM parameters)", cfg.path, adapter.name, next(model.parameters()).dtype,
             sum(p.numel() for p in model.parameters()) / 1e6)
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter)


def forget_gguf_origin(model: nn.Module) -> None:
    """A GGUF checkpoint is dequantized to float on load, but transformers still marks the model
    as GGUF-quantized and refuses to save it; drop that mark so save_trans/save_fake work."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)


def _common_kwargs(cfg: ModelSection) -> dict:
    kwargs: dict = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.gguf_file:
        kwargs["gguf_file"] = cfg.gguf_file
    return kwargs


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
