"""`llmc inspect` on hostile folders: it returns a description or raises one `LlmcError` line, never another
exception, and never blocks (FIFOs, devices) or reads without bound (huge headers, /dev/zero).

Hypothesis builds the folders: random JSON for config.json and its quantization_config (also shaped like the
real compressed-tensors / AWQ / GPTQ ones, with wrong types inside), valid safetensors files of the tensor names
inspect looks at (then truncated or with garbage bytes written in), hand-made headers, and random index files.
The explicit cases are the ones a tester reported.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from llmc.cli import main
from llmc.errors import LlmcError
from llmc.inspect import CheckpointInfo, format_info, inspect_checkpoint

pytestmark = pytest.mark.reliability("inspect")
FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TIMEOUT = 30.0


def outcome(folder: Path, sparsity: bool = True) -> CheckpointInfo | LlmcError:
    """What inspect makes of the folder; any exception other than LlmcError fails the test, as does a bad message."""
    try:
        info = inspect_checkpoint(folder, sparsity=sparsity)
    except LlmcError as exc:
        message = str(exc)
        assert message and "\n" not in message and "\r" not in message, repr(message)
        message.encode("utf-8")  # printable on a UTF-8 terminal (no lone surrogates)
        if currently_in_test_context():
            event("error: " + re.sub(r"\(.*", "", message.rpartition("/")[2])[:60])
        return exc
    format_info(info).encode("utf-8")
    if currently_in_test_context():
        event(f"described: {info.format[:40]}; sparsity {'measured' if info.sparsity is not None else 'not measured'}")
    return info


def promptly(folder: Path, sparsity: bool = True) -> CheckpointInfo | LlmcError:
    """`outcome` in a daemon thread, failing if it takes more than TIMEOUT seconds (a blocked open)."""
    result: list = []

    def target():
        try:
            result.append(outcome(folder, sparsity))
        except BaseException as exc:  # noqa: BLE001 -- handed to the test thread
            result.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(TIMEOUT)
    assert not thread.is_alive(), f"inspect did not return within {TIMEOUT:.0f} s"
    if isinstance(result[0], BaseException) and not isinstance(result[0], LlmcError):
        raise result[0]
    return result[0]


def error_of(folder: Path, *words: str) -> str:
    out = promptly(folder)
    assert isinstance(out, LlmcError), f"expected an error, got {out}"
    for word in words:
        assert word in str(out), str(out)
    return str(out)


# ---------------------------------------------------------------- strategies

def finite_or_not() -> st.SearchStrategy:
    return st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.just(float("nan")))


SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), finite_or_not(),
    st.text(max_size=12), st.sampled_from(["compressed-tensors", "awq", "gptq", "pack-quantized", "group",
                                           "channel", "int", "float", "dense", "sparse-24-bitmask", "\ud800", "a\nb"]),
    st.integers(min_value=-2, max_value=40),
)
JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                    max_leaves=12)


def maybe(value: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly the plausible value, sometimes any JSON value (a wrong type)."""
    return st.one_of(value, value, value, JSON)


ARGS = st.fixed_dictionaries({}, optional={
    "num_bits": maybe(st.sampled_from([4, 8, 0, 33, 2**40])), "type": maybe(st.sampled_from(["int", "float"])),
    "strategy": maybe(st.sampled_from(["group", "channel", "tensor", "token"])),
    "group_size": maybe(st.sampled_from([32, 128, -1, 0, None])), "symmetric": JSON, "dynamic": JSON,
})
GROUP = st.fixed_dictionaries({}, optional={"weights": maybe(ARGS), "input_activations": maybe(ARGS),
                                            "targets": JSON, "format": maybe(st.just("pack-quantized"))})
SPARSITY = st.fixed_dictionaries({}, optional={
    "format": maybe(st.sampled_from(["dense", "sparse-24-bitmask", "sparse-bitmask"])),
    "global_sparsity": st.one_of(finite_or_not(), st.integers(min_value=-(2**80), max_value=2**80), JSON),
    "sparsity_structure": JSON})
CT = st.fixed_dictionaries({"quant_method": st.just("compressed-tensors")}, optional={
    "format": maybe(st.sampled_from(["pack-quantized", "int-quantized", "float-quantized", "naive-quantized"])),
    "config_groups": maybe(st.dictionaries(st.sampled_from(["group_0", "group_1"]), maybe(GROUP), max_size=2)),
    "sparsity_config": maybe(SPARSITY)})
AWQ_GPTQ = st.fixed_dictionaries({"quant_method": maybe(st.sampled_from(["awq", "gptq", "fp8", "bitsandbytes"]))},
                                 optional={k: maybe(st.sampled_from([4, 8, 128, -1, True, "4"])) for k in
                                           ("bits", "w_bit", "group_size", "q_group_size")} | {
                                     k: JSON for k in ("zero_point", "sym", "desc_act", "version", "symmetric")})
QUANT = st.one_of(CT, CT, AWQ_GPTQ, JSON)
CONFIG = st.one_of(
    st.fixed_dictionaries({"model_type": st.just("llama")},
                          optional={"quantization_config": QUANT, "llmc_sparsity": maybe(SPARSITY)}),
    JSON,
)

LEAVES = ["weight", "weight_packed", "weight_shape", "weight_scale", "weight_zero_point", "qweight", "qzeros",
          "scales", "g_idx", "compressed", "bitmask", "shape", "bias"]
DTYPES = ["float32", "float16", "bfloat16", "int32", "int64", "int8", "uint8", "bool", "float8_e4m3fn"]


@st.composite
def tensors(draw) -> dict:
    import torch

    out = {}
    for _ in range(draw(st.integers(min_value=0, max_value=5))):
        module = draw(st.sampled_from(["model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj", "lm_head",
                                       "model.embed_tokens", "x"]))
        leaf = draw(st.sampled_from(LEAVES))
        shape = draw(st.lists(st.integers(min_value=0, max_value=12), max_size=3))
        dtype = getattr(torch, draw(st.sampled_from(DTYPES)))
        fill = draw(st.sampled_from(["zeros", "ones", "big", "negative", "random"]))
        if dtype.is_floating_point:
            t = {"zeros": torch.zeros, "ones": torch.ones}.get(fill, torch.randn)(shape).to(dtype)
        elif dtype == torch.bool:
            t = torch.ones(shape, dtype=dtype)
        else:
            info = torch.iinfo(dtype)
            value = {"zeros": 0, "ones": 1, "big": info.max, "negative": info.min}.get(fill)
            t = torch.full(shape, value, dtype=dtype) if value is not None else torch.randint(
                0, min(info.max, 64), shape, dtype=dtype)
        out[f"{module}.{leaf}"] = t
    return out


@st.composite
def safetensors_bytes(draw) -> bytes:
    from safetensors.torch import save

    kind = draw(st.sampled_from(["valid", "valid", "truncated", "garbage", "random", "header"]))
    if kind == "random":
        return draw(st.binary(max_size=64))
    if kind == "header":  # a hand-made header: any JSON, any declared length, some data
        header = json.dumps(draw(st.one_of(JSON, st.dictionaries(st.text(max_size=6), st.fixed_dictionaries({
            "dtype": maybe(st.sampled_from(["F32", "I32", "F8_E4M3", "XX"])),
            "shape": maybe(st.lists(st.integers(min_value=-1, max_value=2**62), max_size=3)),
            "data_offsets": maybe(st.lists(st.integers(min_value=-1, max_value=2**62), max_size=3))}),
            max_size=3)))).encode()
        length = draw(st.one_of(st.just(len(header)), st.integers(min_value=0, max_value=2**64 - 1)))
        return struct.pack("<Q", length) + header + draw(st.binary(max_size=32))
    data = save(draw(tensors()))
    if kind == "truncated":
        return data[: draw(st.integers(min_value=0, max_value=len(data)))]
    if kind == "garbage":
        at = draw(st.integers(min_value=0, max_value=len(data)))
        junk = draw(st.binary(min_size=1, max_size=16))
        return data[:at] + junk + data[at + len(junk):]
    return data


INDEX = st.one_of(JSON, st.fixed_dictionaries({"weight_map": maybe(st.dictionaries(
    st.text(max_size=6), maybe(st.sampled_from(["model.safetensors", "missing.safetensors", "../model.safetensors",
                                                "/etc/passwd", "", ".", "config.json", "sub/model.safetensors"])),
    max_size=3))}, optional={"metadata": JSON}))


def write(folder: Path, config: object, files: dict[str, bytes], index: object = None) -> None:
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, allow_nan=True), encoding="utf-8", errors="surrogatepass")
    for name, data in files.items():
        (folder / name).write_bytes(data)
    if index is not None:
        (folder / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8",
                                                              errors="surrogatepass")


# ---------------------------------------------------------------- fuzzing

@FUZZ
@given(config=CONFIG, sparsity=st.booleans())
def test_random_configs(config, sparsity):
    """Random config.json over a small valid dense file."""
    import torch
    from safetensors.torch import save

    with tempfile.TemporaryDirectory() as tmp:
        write(Path(tmp), config, {"model.safetensors": save({"model.layers.0.mlp.up_proj.weight": torch.ones(4, 8)})})
        outcome(Path(tmp), sparsity)


@FUZZ
@given(config=st.one_of(st.fixed_dictionaries({"quantization_config": QUANT}), CONFIG),
       shards=st.lists(safetensors_bytes(), min_size=1, max_size=2), sparsity=st.booleans())
def test_random_safetensors(config, shards, sparsity):
    """Random (valid, truncated, garbage, hand-made) safetensors files under random quantization configs."""
    files = {f"model-{i:05d}.safetensors": data for i, data in enumerate(shards)}
    with tempfile.TemporaryDirectory() as tmp:
        write(Path(tmp), config, files)
        outcome(Path(tmp), sparsity)


@st.composite
def quantized_layer(draw) -> tuple[dict, dict]:
    """A compressed-tensors config and one linear stored the way its format stores it, with shapes, dtypes and
    values that are mostly right and sometimes off (so the decompressor and the legacy bitmask expansion run)."""
    import torch

    out_, in_ = draw(st.sampled_from([8, 16])), draw(st.sampled_from([8, 32]))
    bits = draw(st.sampled_from([4, 4, 8, 8, 2, 3, 16]))
    strategy = draw(st.sampled_from(["channel", "group", "tensor"]))
    fmt = draw(st.sampled_from(["pack-quantized", "int-quantized", "float-quantized", "naive-quantized", "nope"]))
    weights = {"num_bits": bits, "type": "int", "symmetric": draw(st.sampled_from([True, True, False])), "strategy": strategy,
               "group_size": draw(st.sampled_from([8, 0, 3, 64])) if strategy == "group" else None}
    qc = {"quant_method": "compressed-tensors", "format": fmt,
          "config_groups": {"group_0": {"weights": weights, "targets": ["Linear"]}}}
    dim = lambda n: draw(st.sampled_from([n] * 12 + [1, 0, n * 2 + 1]))  # noqa: E731
    name = "model.layers.0.mlp.up_proj"
    groups = in_ // weights["group_size"] if strategy == "group" and weights["group_size"] in (8, 3) else 1
    tensors = {f"{name}.weight_scale": torch.rand(dim(out_), dim(groups)),
               f"{name}.weight_zero_point": torch.zeros(dim(out_), 1, dtype=draw(st.sampled_from(
                   [torch.int32, torch.int8, torch.float32])))}
    if draw(st.sampled_from([fmt == "pack-quantized"] * 4 + [True, False])):
        words = max(1, in_ * bits // 32)
        tensors[f"{name}.weight_packed"] = torch.randint(-(2**31), 2**31 - 1, (dim(out_), dim(words)),
                                                         dtype=torch.int32)
        tensors[f"{name}.weight_shape"] = torch.tensor([dim(out_), dim(in_)], dtype=draw(st.sampled_from(
            [torch.int64, torch.int32, torch.float32])))
    else:
        tensors[f"{name}.weight"] = torch.randint(-8, 8, (dim(out_), dim(in_))).to(draw(st.sampled_from(
            [torch.int8, torch.float8_e4m3fn, torch.float16])))
    if draw(st.booleans()):  # the legacy sparse layout
        from compressed_tensors.utils import pack_bitmasks

        mask = torch.rand(dim(out_), dim(in_)) < 0.5
        legacy = "model.layers.1.mlp.up_proj"
        tensors[f"{legacy}.compressed"] = torch.ones(draw(st.sampled_from([int(mask.sum()), 3])),
                                                     dtype=draw(st.sampled_from([torch.float32, torch.int8])))
        tensors[f"{legacy}.bitmask"] = pack_bitmasks(mask)
        tensors[f"{legacy}.shape"] = torch.tensor([dim(mask.shape[0]), dim(mask.shape[1])])
        qc["sparsity_config"] = {"format": draw(st.sampled_from(["sparse-bitmask", "sparse-24-bitmask"]))}
    return qc, tensors


@FUZZ
@given(layer=quantized_layer(), sparsity=st.booleans())
def test_random_quantized_layers(layer, sparsity):
    from safetensors.torch import save

    qc, tensors_ = layer
    with tempfile.TemporaryDirectory() as tmp:
        write(Path(tmp), {"quantization_config": qc}, {"model.safetensors": save(tensors_)})
        outcome(Path(tmp), sparsity)


@FUZZ
@given(index=INDEX, raw=st.one_of(st.none(), st.binary(max_size=32)))
def test_random_index_files(index, raw):
    """Random model.safetensors.index.json next to one valid shard (or raw bytes in the index)."""
    import torch
    from safetensors.torch import save

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ckpt"
        write(folder, {"model_type": "llama"}, {"model.safetensors": save({"lm_head.weight": torch.ones(2, 2)})},
              index)
        if raw is not None:
            (folder / "model.safetensors.index.json").write_bytes(raw)
        (Path(tmp) / "model.safetensors").write_bytes(b"outside")
        outcome(folder)


# ---------------------------------------------------------------- the reported cases

def dense_folder(path: Path, config: object = None) -> Path:
    import torch
    from safetensors.torch import save

    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama"} if config is None else config))
    (path / "model.safetensors").write_bytes(save({"lm_head.weight": torch.ones(2, 2)}))
    return path


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_as_model_safetensors_returns_promptly(tmp_path):
    folder = dense_folder(tmp_path / "ckpt")
    (folder / "model.safetensors").unlink()
    os.mkfifo(folder / "model.safetensors")
    error_of(folder, "model.safetensors", "FIFO", "not a regular file")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_as_config_json_and_index_return_promptly(tmp_path):
    folder = dense_folder(tmp_path / "ckpt")
    os.mkfifo(folder / "model.safetensors.index.json")
    error_of(folder, "model.safetensors.index.json", "FIFO")
    (folder / "config.json").unlink()
    os.mkfifo(folder / "config.json")
    error_of(folder, "config.json", "FIFO")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_through_the_cli_is_one_line(tmp_path):
    """The whole command in a subprocess, with a timeout: exit status 2 and one `llmc: error:` line."""
    import subprocess

    folder = dense_folder(tmp_path / "ckpt")
    (folder / "model.safetensors").unlink()
    os.mkfifo(folder / "model.safetensors")
    code = "import sys; from llmc.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, "inspect", str(folder)], capture_output=True, text=True,
                          timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and done.stdout == "", done
    assert len(lines) == 1 and lines[0].startswith("llmc: error: ") and "FIFO" in lines[0], done.stderr


def test_config_json_that_is_a_list(tmp_path):
    error_of(dense_folder(tmp_path / "ckpt", [1, 2, {"quantization_config": {}}]), "config.json", "a list",
             "not a JSON object")


@pytest.mark.parametrize("qc", ["awq", 4, ["gptq"], True])
def test_quantization_config_of_the_wrong_type(tmp_path, qc):
    error_of(dense_folder(tmp_path / "ckpt", {"quantization_config": qc}), "quantization_config", "not an object")


@pytest.mark.parametrize("qc,words", [
    ({"quant_method": "gptq", "bits": "4"}, ["quantization_config.bits", "the string '4'"]),
    ({"quant_method": "awq", "bits": float("nan")}, ["quantization_config.bits", "nan"]),
    ({"quant_method": "gptq", "bits": 10**30}, ["quantization_config.bits", "1 to 32"]),
    ({"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": [4]}}}, ["config_groups.g.weights"]),
    ({"quant_method": "compressed-tensors", "config_groups": []}, ["config_groups", "a list"]),
    ({"quant_method": ["awq"]}, ["quant_method", "not a string"]),
])
def test_wrong_types_inside_quantization_config(tmp_path, qc, words):
    error_of(dense_folder(tmp_path / "ckpt", {"quantization_config": qc}), *words)


def test_group_strategy_without_group_size_is_described(tmp_path):
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized",
          "config_groups": {"g": {"weights": {"num_bits": 4, "strategy": "group"}}},
          "sparsity_config": {"format": "dense", "global_sparsity": 10**30}}
    info = promptly(dense_folder(tmp_path / "ckpt", {"quantization_config": qc}))
    assert isinstance(info, CheckpointInfo) and info.weights.startswith("int4, group None")


@pytest.mark.parametrize("text,words", [
    ("[" * 100_000 + "]" * 100_000, ["nested too deeply"]),
    ('{"a": ' + "9" * 5000 + "}", ["5,000 digits"]),
    (b"\xff\xfe{}", ["not valid JSON"]),
    ("", ["not valid JSON"]),
    ('{"quantization_config": NaN}', ["quantization_config", "nan"]),
])
def test_malformed_config_json(tmp_path, text, words):
    folder = dense_folder(tmp_path / "ckpt")
    (folder / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    error_of(folder, "config.json", *words)


def test_symlink_to_dev_zero_named_model_safetensors(tmp_path):
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    folder = dense_folder(tmp_path / "ckpt")
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to("/dev/zero")
    error_of(folder, "model.safetensors", "character device", "through a symlink", "not a regular file")


def test_symlinked_files_to_regular_files_are_read(tmp_path):
    """As in the Hugging Face cache: every file a symlink to a blob elsewhere."""
    src = dense_folder(tmp_path / "blobs")
    folder = tmp_path / "snapshot"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).symlink_to(src / name)
    assert isinstance(promptly(folder), CheckpointInfo)
    (folder / "config.json").unlink()
    (folder / "config.json").symlink_to(tmp_path / "nowhere.json")
    error_of(folder, "config.json", "symlink to a missing file")


def test_directory_named_config_json(tmp_path):
    folder = dense_folder(tmp_path / "ckpt")
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()
    error_of(folder, "config.json", "a directory", "not a regular file")


def test_directory_named_model_safetensors(tmp_path):
    folder = dense_folder(tmp_path / "ckpt")
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    (folder / "model.safetensors").mkdir()
    error_of(folder, "model.safetensors", "a directory")


def test_oversized_config_json_is_not_read(tmp_path):
    folder = dense_folder(tmp_path / "ckpt")
    with open(folder / "config.json", "r+b") as f:
        f.truncate(17 * 2**20)  # sparse: no disk used
    error_of(folder, "config.json", "over the 16,777,216 bytes")


@pytest.mark.parametrize("header_len,words", [(2**63, ["over the 104,857,600 bytes"]), (1000, ["truncated"])])
def test_safetensors_header_length_beyond_bounds(tmp_path, header_len, words):
    folder = dense_folder(tmp_path / "ckpt")
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", header_len) + b"{}")
    error_of(folder, "model.safetensors", *words)


@pytest.mark.parametrize("data,words", [
    (b"", ["0 bytes"]), (b"\x00" * 7, ["shorter than its 8-byte header length"]),
    (struct.pack("<Q", 2) + b"[]", ["a list, not an object"]),
    (struct.pack("<Q", 2) + b"{[", ["not valid JSON"]),
    (struct.pack("<Q", 60) + b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}'.ljust(60), ["outside"]),
    (struct.pack("<Q", 60) + b'{"w":{"dtype":"F32","shape":[9],"data_offsets":[0,4]}}'.ljust(60) + b"\0" * 4,
     ["needs 36 bytes"]),
])
def test_garbage_safetensors(tmp_path, data, words):
    folder = dense_folder(tmp_path / "ckpt")
    (folder / "model.safetensors").write_bytes(data)
    error_of(folder, "model.safetensors", "not a readable safetensors file", *words)


@pytest.mark.parametrize("shard,words", [
    ("missing.safetensors", ["which is missing"]), ("../model.safetensors", ["outside the checkpoint folder"]),
    ("/etc/passwd", ["outside the checkpoint folder"]), ("config.json", ["not a .safetensors file"]),
    (7, ["not a shard file name"]),
])
def test_index_pointing_to_missing_or_outside_files(tmp_path, shard, words):
    folder = dense_folder(tmp_path / "ckpt")
    (tmp_path / "model.safetensors").write_bytes(b"outside")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": shard}}))
    error_of(folder, "model.safetensors.index.json", *words)


def test_valid_index_is_accepted(tmp_path):
    folder = dense_folder(tmp_path / "ckpt")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 16}, "weight_map": {"lm_head.weight": "model.safetensors"}}))
    assert isinstance(promptly(folder), CheckpointInfo)


def test_hostile_shape_tensors(tmp_path):
    """weight_shape and legacy `shape` tensors that claim more weights than stored, or are not shapes at all."""
    import torch
    from safetensors.torch import save

    from llmc.inspect import CheckpointError

    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized",
          "config_groups": {"g": {"weights": {"num_bits": 4, "strategy": "channel"}}}}
    cases = [
        ({"m.weight_packed": torch.zeros(4, 1, dtype=torch.int32), "m.weight_shape": torch.tensor([10**9, 10**9]),
          "m.weight_scale": torch.ones(4, 1)}, "more weights than"),
        ({"m.weight_packed": torch.zeros(4, 1, dtype=torch.int32), "m.weight_shape": torch.tensor([4.0, 8.0]),
          "m.weight_scale": torch.ones(4, 1)}, "not a shape"),
        ({"m.weight_packed": torch.zeros(4, 1, dtype=torch.int32), "m.weight_shape": torch.tensor([4]),
          "m.weight_scale": torch.ones(4, 1)}, "not a shape"),
        ({"m.compressed": torch.ones(2), "m.bitmask": torch.zeros(1, 1, dtype=torch.uint8),
          "m.shape": torch.tensor([2**40, 2**40])}, "not the packed bitmask"),
        ({"m.compressed": torch.ones(2), "m.bitmask": torch.zeros(1, 1, dtype=torch.uint8),
          "m.shape": torch.tensor([-1, 8])}, "negative size"),
    ]
    for i, (tensors_, word) in enumerate(cases):
        folder = tmp_path / f"c{i}"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"quantization_config": qc if i < 3 else None}))
        (folder / "model.safetensors").write_bytes(save(tensors_))
        out = promptly(folder)
        assert isinstance(out, CheckpointError) and word in str(out), (i, out)


def test_special_characters_in_names_print_on_one_line(tmp_path):
    import torch
    from safetensors.torch import save

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "gptq\n\x1b[31m", "bits": 4, "llmc": "\ud800"}}, ensure_ascii=True))
    (folder / "model.safetensors").write_bytes(save({"a\nb.weight": torch.ones(2, 2)}))
    info = promptly(folder)
    assert isinstance(info, CheckpointInfo)
    text = format_info(info)
    assert "a\\nb" in text and "\x1b" not in text and len(text.splitlines()) == 10 + len(info.sparsity or [])
    assert math.isnan(info.ratio) or info.ratio > 0


def test_missing_folder_through_the_cli(capsys, tmp_path):
    assert main(["inspect", str(tmp_path / "nope\udcff")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
