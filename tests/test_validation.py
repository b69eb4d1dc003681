"""Every bad input is one clear error line before the model loads (or, for names that need the
model's structure, right after it loads and before calibration); no NaN/Inf weight is quantized
or saved silently; corrupt or pickled model files never give a traceback."""

from __future__ import annotations

import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_bad_input import RTN_W4, bad_run, run, save_section, write_config

from llmc.cli import main
from llmc.config import load_config
from llmc.config.schema import ModelSection
from llmc.errors import ConfigError, ModelError, NumericsError
from llmc.finite import check_model_weights
from llmc.models.loader import check_gguf, check_model_paths, check_safetensors, load_model, warn_remote_code

CONFIG = pytest.mark.reliability("config")
PATHS = pytest.mark.reliability("paths")
FILES = pytest.mark.reliability("model files")
NUMERICS = pytest.mark.reliability("numerics")


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg, msg
    return msg


def minimal(**sections) -> dict:
    return {"model": {"path": "some/model"}, **sections}


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Fail the test if the model loads, calibration, quantization or evaluation starts."""
    import llmc.runner

    def forbidden(*_a, **_k):
        raise AssertionError("heavy work started before the input was checked")

    for name in ("load_model", "build_calibration", "compress_model", "evaluate_perplexity"):
        monkeypatch.setattr(llmc.runner, name, forbidden)


@pytest.fixture
def no_calibration(monkeypatch):
    """Fail the test if calibration or quantization starts (the model may load)."""
    import llmc.runner

    def forbidden(*_a, **_k):
        raise AssertionError("calibration started before the ignored layers were checked")

    for name in ("build_calibration", "compress_model", "evaluate_perplexity"):
        monkeypatch.setattr(llmc.runner, name, forbidden)


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------- config: schema


@CONFIG
@pytest.mark.parametrize("preproc,words", [("gen", ["did you mean 'general'"]), ("shuffle", ["padded_docs"])])
def test_unknown_calib_preproc(preproc, words):
    with pytest.raises(ConfigError) as exc:
        load_config(minimal(calib={"preproc": preproc}))
    msg = one_line(exc)
    assert msg.startswith("calib.preproc: unknown calibration preproc") and repr(preproc) in msg
    for word in words:
        assert word in msg


@CONFIG
def test_eval_has_no_preproc():
    with pytest.raises(ConfigError, match=r"unknown key 'eval\.preproc'") as exc:
        load_config(minimal(eval={"preproc": "general"}))
    one_line(exc)


@CONFIG
@pytest.mark.parametrize("section,name", [("calib", "wikitext"), ("eval", "pileval"), ("eval", ["c4", "wiki2"])])
def test_unknown_data_set_names(section, name):
    with pytest.raises(ConfigError) as exc:
        load_config(minimal(**{section: {"name": name}}))
    msg = one_line(exc)
    assert msg.startswith(f"{section}.name: unknown") and "use one of" in msg and "wikitext2" in msg


@CONFIG
@pytest.mark.parametrize(
    "text,key,line,first",
    [
        ("model: {path: m}\nquant: {method: RTN}\neval: {}\nquant: {method: GPTQ}\n", "quant", 4, 2),
        ("model:\n  path: m\n  path: n\n", "path", 3, 2),
        ("model: {path: m}\nquant:\n  weight:\n    bit: 4\n    group_size: 32\n    bit: 3\n", "bit", 6, 4),
        ("model: {path: m, path: n}\n", "path", 1, 1),
    ],
)
def test_duplicate_yaml_keys(text, key, line, first):
    with pytest.raises(ConfigError) as exc:
        load_config(text)
    msg = one_line(exc)
    assert f"duplicate key {key!r} at line {line}" in msg and f"first at line {first}" in msg
    assert "remove" in msg


@CONFIG
def test_merge_keys_may_still_be_overridden():
    cfg = load_config("model: {path: m}\neval:\n  <<: {seq_len: 256, bs: 2}\n  seq_len: 128\n")
    assert (cfg.eval.seq_len, cfg.eval.bs) == (128, 2)


@CONFIG
def test_duplicate_section_through_cli(capsys, tmp_path, tiny_llama_dir):
    text = (f"model:\n  path: {tiny_llama_dir}\nquant:\n  method: RTN\n  weight: {{bit: 4, group_size: 32}}\n"
            f"save:\n  save_path: {tmp_path / 'out'}\nquant:\n  method: GPTQ\n")
    bad_run(capsys, tmp_path, text, "duplicate key 'quant'", "line 8", "first at line 3", "config.yml")


@CONFIG
@pytest.mark.parametrize("seed", [2**32, -1, 2**63])
@pytest.mark.parametrize("section", ["base", "calib"])
def test_seed_out_of_range(seed, section):
    with pytest.raises(ConfigError) as exc:
        load_config(minimal(**{section: {"seed": seed}}))
    msg = one_line(exc)
    assert msg.startswith(f"{section}.seed: seed {seed} is outside 0..4294967295") and "numpy" in msg


@CONFIG
def test_seed_limits_are_valid():
    assert load_config(minimal(base={"seed": 2**32 - 1})).base.seed == 2**32 - 1
    assert load_config(minimal(base={"seed": 0})).base.seed == 0


@CONFIG
@pytest.mark.parametrize("device", ["meta", "cuda:x", "tpu", "cuda:", "CPU", "cuda:-1"])
def test_bad_device_names(device):
    with pytest.raises(ConfigError) as exc:
        load_config(minimal(base={"device": device}))
    msg = one_line(exc)
    assert msg.startswith(f"base.device: {device!r} is not a device")
    assert "auto, cpu, cuda, cuda:N" in msg


@CONFIG
@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:3"])
def test_good_device_names(device):
    assert load_config(minimal(base={"device": device})).base.device == device


@CONFIG
@pytest.mark.parametrize(
    "block_id,words",
    [("a-b", ["'a-b'", "ranges like '2-5'"]), ("5-3", ["backwards", "'3-5'"]), (-1, ["negative"]),
     ("1-", ["'1-'"]), ("", ["''"]), ("1-2-3", ["'1-2-3'"]), (True, ["True"])],
)
@pytest.mark.parametrize("section", ["quant", "sparse"])
def test_bad_block_ranges(block_id, words, section):
    extra = {"method": "Magnitude"} if section == "sparse" else {}
    with pytest.raises(ConfigError) as exc:
        load_config(minimal(**{section: {**extra, "ignored_layers": {"block_ids": [0, block_id]}}}))
    msg = one_line(exc)
    assert msg.startswith(f"{section}.ignored_layers.block_ids.1: ")
    for word in words:
        assert word in msg


@CONFIG
@pytest.mark.parametrize(
    "calib,words",
    [
        ({"n_samples": 0}, ["calib.n_samples", "got 0"]),
        ({"seq_len": -5}, ["calib.seq_len", "got -5"]),
        ({"name": "wiki"}, ["calib.name", "'wiki'", "wikitext2"]),
        ({"preproc": "nope"}, ["calib.preproc", "'nope'"]),
        ({"bs": -3}, ["calib.bs", "-1"]),
    ],
)
def test_broken_calib_with_rtn_is_an_error(capsys, tmp_path, tiny_llama_dir, no_heavy_work, calib, words):
    """RTN does not calibrate, but a broken calib section is still an error."""
    cfg = tiny_config(tiny_llama_dir, quant=RTN_W4, eval=None, save=save_section(tmp_path))
    cfg["calib"].update(calib)
    bad_run(capsys, tmp_path, cfg, *words)


@CONFIG
@pytest.mark.parametrize(
    "calib,words",
    [
        ({"name": "custom"}, ["'custom' data needs a file", "calib.path"]),
        ({"name": "pileval"}, ["no bundled copy of 'pileval'", "calib.path"]),
        ({"name": "custom", "download": True}, ["cannot be downloaded", "calib.download: false"]),
    ],
)
def test_unusable_calib_source_with_rtn(capsys, tmp_path, tiny_llama_dir, no_heavy_work, calib, words):
    cfg = tiny_config(tiny_llama_dir, quant=RTN_W4, eval=None, save=save_section(tmp_path))
    cfg["calib"].update(calib)
    bad_run(capsys, tmp_path, cfg, *words)


# ---------------------------------------------------------------- config: files and paths


@PATHS
def test_missing_config_without_yaml_suffix_subprocess(tmp_path):
    """`llmc run missing.conf` says the file does not exist (it used to say "must be a mapping")."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "llmc", "run", "missing.conf", "-q"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "llmc: error: config file missing.conf not found (it does not exist); "
        "pass the path of an existing YAML file"
    ]


@PATHS
@pytest.mark.parametrize("name", ["missing.conf", "configs/run", "~/nope.cfg"])
def test_missing_config_paths(capsys, tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    code = main(["run", name, "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "does not exist" in err and "mapping" not in err


@PATHS
def test_config_path_is_a_folder(capsys, tmp_path):
    code, _, err = run(capsys, tmp_path)
    assert code == 2 and "Traceback" not in err
    assert err.strip() == f"llmc: error: config path {tmp_path} is a folder, not a file; pass the path of a YAML file"


@PATHS
def test_model_path_is_a_file(capsys, tmp_path, tiny_llama_dir, no_heavy_work):
    cfg = tiny_config(tiny_llama_dir / "model.safetensors", quant=RTN_W4, save=save_section(tmp_path))
    bad_run(capsys, tmp_path, cfg, "model.path", "is a file, not a folder")


@PATHS
def test_gguf_model_path_hint(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelError) as exc:
        check_model_paths(ModelSection(path=str(tmp_path / "m.gguf")))
    assert "model.gguf_file: m.gguf" in one_line(exc)


@PATHS
def test_gguf_file_is_a_folder(capsys, tmp_path, tiny_llama_dir, no_heavy_work):
    model = copy_model(tiny_llama_dir, tmp_path / "model")
    (model / "w.gguf").mkdir()
    cfg = tiny_config(model, quant=RTN_W4, save=save_section(tmp_path))
    cfg["model"]["gguf_file"] = "w.gguf"
    bad_run(capsys, tmp_path, cfg, "model.gguf_file w.gguf", "is a folder, not a file")


@PATHS
@pytest.mark.parametrize("kind", ["file", "missing"])
def test_bad_tokenizer_path(capsys, tmp_path, tiny_llama_dir, no_heavy_work, kind):
    cfg = tiny_config(tiny_llama_dir, quant=RTN_W4, save=save_section(tmp_path))
    cfg["model"]["tokenizer_path"] = str(tiny_llama_dir / "tokenizer.json" if kind == "file" else tmp_path / "tok")
    words = ["is a file, not a folder"] if kind == "file" else ["tokenizer path", "not found"]
    bad_run(capsys, tmp_path, cfg, "model.tokenizer_path", *words)


@PATHS
def test_missing_calib_path_with_rtn(capsys, tmp_path, tiny_llama_dir, no_heavy_work):
    cfg = tiny_config(tiny_llama_dir, quant=RTN_W4, eval=None, save=save_section(tmp_path))
    cfg["calib"].update(name="custom", path=str(tmp_path / "calib.jsonl"))
    bad_run(capsys, tmp_path, cfg, "calib.path", "calib.jsonl", "does not exist")


@PATHS
@pytest.mark.parametrize("section", ["calib", "eval"])
def test_data_folder_without_data_files(capsys, tmp_path, tiny_llama_dir, no_heavy_work, section):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.md").write_text("x", encoding="utf-8")
    cfg = tiny_config(tiny_llama_dir, quant=RTN_W4, save=save_section(tmp_path))
    cfg[section].update(name="custom", path=str(tmp_path / "data"))
    bad_run(capsys, tmp_path, cfg, f"{section}.path", "folder with no data files")


# ---------------------------------------------------------------- config: names that need the model


@CONFIG
@pytest.mark.parametrize(
    "ignored,words",
    [
        ({"layer_names": ["mlp.down_prj"]}, ["quant.ignored_layers.layer_names", "'mlp.down_prj'",
                                             "did you mean 'mlp.down_proj'"]),
        ({"layer_names": ["model.layers.0.mlp.down_proj"]}, ["full module name", "speical_names"]),
        ({"speical_names": ["model.layer.1.self_attn.q_proj"]},
         ["quant.ignored_layers.speical_names", "did you mean 'model.layers.1.self_attn.q_proj'"]),
        ({"speical_names": ["self_attn.q_proj"]}, ["name inside a block", "layer_names"]),
        ({"block_ids": ["2-7"]}, ["quant.ignored_layers.block_ids", "'2-7'", "3 blocks", "0..2"]),
    ],
)
def test_ignored_layers_matching_nothing(capsys, tmp_path, tiny_llama_dir, no_calibration, ignored, words):
    cfg = tiny_config(tiny_llama_dir, quant={**RTN_W4, "ignored_layers": ignored}, save=save_section(tmp_path))
    bad_run(capsys, tmp_path, cfg, *words)


# ---------------------------------------------------------------- model files


def _model_dir(tmp_path: Path, tiny_llama_dir: Path) -> Path:
    return copy_model(tiny_llama_dir, tmp_path / "model")


@FILES
@pytest.mark.parametrize("cut", ["header", "data", "short"])
def test_truncated_safetensors(capsys, tmp_path, tiny_llama_dir, no_heavy_work, cut):
    model = _model_dir(tmp_path, tiny_llama_dir)
    file = model / "model.safetensors"
    data = file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    keep = {"header": 8 + n // 2, "data": len(data) - 1000, "short": 5}[cut]
    file.write_bytes(data[:keep])
    cfg = tiny_config(model, quant=RTN_W4, save=save_section(tmp_path))
    line = bad_run(capsys, tmp_path, cfg, "model.safetensors", "corrupt or truncated", "re-download")
    assert {"header": "does not fit", "data": "data cut short", "short": "shorter than"}[cut] in line


@FILES
def test_missing_shard(tmp_path, tiny_llama_dir):
    model = _model_dir(tmp_path, tiny_llama_dir)
    (model / "model.safetensors.index.json").write_text(
        '{"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}', encoding="utf-8")
    with pytest.raises(ModelError, match="model-00002-of-00002.safetensors listed in .* is missing") as exc:
        check_model_paths(ModelSection(path=str(model)))
    one_line(exc)


def _small_safetensors() -> bytes:
    from safetensors.torch import save

    g = torch.Generator().manual_seed(0)
    return save({"a": torch.randn(4, 3, generator=g), "b": torch.arange(6, dtype=torch.int64),
                 "c": torch.randn(2, 2, generator=g).to(torch.bfloat16), "empty": torch.zeros(0, 3)},
                metadata={"format": "pt"})


SMALL = _small_safetensors()


def mutations():
    n = len(SMALL)
    truncations = st.integers(0, n - 1).map(lambda k: SMALL[:k])
    random_files = st.binary(max_size=300)
    overwrite = st.builds(lambda at, junk: (SMALL[:at] + junk + SMALL[at + len(junk):])[:n],
                          st.integers(0, n - 1), st.binary(min_size=1, max_size=16))
    fake_lengths = st.builds(lambda k, rest: struct.pack("<Q", k) + rest, st.integers(0, 2**64 - 1),
                             st.sampled_from([SMALL[8:], b"", b"{}", SMALL[8:40]]))
    extended = st.binary(min_size=1, max_size=32).map(lambda junk: SMALL + junk)
    return st.one_of(truncations, random_files, overwrite, fake_lengths, extended)


@FILES
@settings(derandomize=True, deadline=None, max_examples=400, suppress_health_check=list(HealthCheck))
@given(mutations())
@example(SMALL[:8])
@example(SMALL[:100])
@example(SMALL[:-1])
@example(struct.pack("<Q", 2) + b"[]")
@example(struct.pack("<Q", 4) + b"null")
def test_fuzz_corrupt_safetensors(blob):
    """A corrupted safetensors file gives ModelError, never another exception; whatever passes
    the header check loads with safetensors."""
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.safetensors")
        with open(path, "wb") as f:
            f.write(blob)
        try:
            check_safetensors(path)
        except ModelError as exc:
            assert "\n" not in str(exc) and "corrupt or truncated" in str(exc)
            return
        load_file(path)  # the check let it through: it must be a readable file


def _tiny_gguf(path: Path) -> bytes:
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", rng.random((64, 64), dtype=np.float32))
    writer.add_tensor("output.weight", rng.random((64, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


@FILES
@pytest.mark.parametrize("damage", ["random bytes", "4 KB", "header cut", "magic only", "empty"])
def test_corrupt_gguf(capsys, tmp_path, tiny_llama_dir, no_heavy_work, damage):
    model = _model_dir(tmp_path, tiny_llama_dir)
    good = _tiny_gguf(tmp_path / "good.gguf")
    check_gguf(str(tmp_path / "good.gguf"), "good")  # the intact file passes
    blob = {"random bytes": os.urandom(8192), "4 KB": good[:4096], "header cut": good[:60], "magic only": b"GGUF",
            "empty": b""}[damage]
    (model / "w.gguf").write_bytes(blob)
    cfg = tiny_config(model, quant=RTN_W4, save=save_section(tmp_path))
    cfg["model"]["gguf_file"] = "w.gguf"
    line = bad_run(capsys, tmp_path, cfg, "w.gguf", "model.gguf_file")
    assert "not a GGUF file" in line or "corrupt or truncated" in line


@FILES
def test_pickled_weights_refused_then_loaded_when_allowed(capsys, tmp_path, tiny_llama_dir):
    from safetensors.torch import load_file

    model = _model_dir(tmp_path, tiny_llama_dir)
    state = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    torch.save(state, model / "pytorch_model.bin")
    cfg = tiny_config(model, quant=RTN_W4, eval=None, save=save_section(tmp_path))
    bad_run(capsys, tmp_path, cfg, "pytorch_model.bin", "pickled", "model.allow_pickle: true")
    loaded = load_model(ModelSection(path=str(model), allow_pickle=True, torch_dtype="float32"))
    assert torch.equal(loaded.model.model.layers[1].mlp.up_proj.weight, state["model.layers.1.mlp.up_proj.weight"])


@FILES
def test_trust_remote_code_names_the_python_files(tmp_path, tiny_llama_dir, caplog):
    model = _model_dir(tmp_path, tiny_llama_dir)
    (model / "modeling_evil.py").write_text("print('hi')\n", encoding="utf-8")
    (model / "sub").mkdir()
    (model / "sub" / "helper.py").write_text("\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="llmc"):
        load_model(ModelSection(path=str(model), trust_remote_code=True, torch_dtype="float32"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "trust_remote_code" in
                r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "modeling_evil.py" in warnings[0] and os.path.join("sub", "helper.py") in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="llmc"):
        warn_remote_code(ModelSection(path="some-org/some-model", trust_remote_code=True))
    assert "hub repository some-org/some-model" in caplog.records[-1].getMessage()


# ---------------------------------------------------------------- numerics


@pytest.fixture(scope="module")
def nan_weight_llama_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    """The tiny Llama with one NaN in block 1's up projection."""
    from safetensors.torch import load_file, save_file

    folder = copy_model(tiny_llama_dir, tmp_path_factory.mktemp("models") / "tiny-llama-nan")
    state = load_file(folder / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@NUMERICS
def test_one_nan_weight_with_rtn_and_no_eval(capsys, tmp_path, nan_weight_llama_dir):
    cfg = tiny_config(nan_weight_llama_dir, quant=RTN_W4, eval=None, save=save_section(tmp_path))
    line = bad_run(capsys, tmp_path, cfg, "model.layers.1.mlp.up_proj.weight has 1 NaN/Inf value(s)",
                   "before quantization", "re-download")
    assert line.count("NaN") == 1


@NUMERICS
def test_nan_outside_the_blocks_is_caught_before_saving(capsys, tmp_path, tiny_llama_dir):
    """A NaN in the head (no block holds it) is caught before anything is written, with or without a method."""
    from safetensors.torch import load_file, save_file

    model = _model_dir(tmp_path, tiny_llama_dir)
    state = load_file(model / "model.safetensors")
    state["lm_head.weight"][0, :2] = float("inf")
    save_file(state, model / "model.safetensors", metadata={"format": "pt"})
    for quant in (RTN_W4, None):
        cfg = tiny_config(model, quant=quant, eval=None, save=save_section(tmp_path))
        if quant is None:
            del cfg["quant"]
        bad_run(capsys, tmp_path, cfg, "lm_head.weight has 2 NaN/Inf value(s)", "nothing was written")


@NUMERICS
def test_nonfinite_fake_quantized_weight_is_named(tmp_path, tiny_llama_dir, monkeypatch):
    from llmc.methods.base import build_weight_quantizer
    from llmc.quant.fake_linear import FakeQuantLinear

    cfg = load_config(tiny_config(tiny_llama_dir, quant=RTN_W4, eval=None))
    loaded = load_model(cfg.model)
    block = loaded.model.model.layers[2]
    for name in ("mlp.down_proj", "self_attn.o_proj"):
        FakeQuantLinear.wrap(block, name, build_weight_quantizer(cfg.quant.weight))
    check_model_weights(loaded.model)  # finite so far
    fq = block.mlp.down_proj
    monkeypatch.setattr(fq, "fake_weight", lambda: torch.full_like(fq.weight, float("nan")))
    with pytest.raises(NumericsError) as exc:
        check_model_weights(loaded.model)
    assert one_line(exc).startswith("model.layers.2.mlp.down_proj.weight (fake-quantized) has")


@NUMERICS
def test_finite_model_saves(capsys, tmp_path, tiny_llama_dir):
    cfg = tiny_config(tiny_llama_dir, quant=RTN_W4, eval=None, save=save_section(tmp_path))
    code, _, err = run(capsys, write_config(tmp_path, cfg))
    assert code == 0, err
    assert (tmp_path / "out" / "fake_quant_model" / "model.safetensors").is_file()

