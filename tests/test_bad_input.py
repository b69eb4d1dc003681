"""Bad input through the CLI: exit status 2, one `llmc: error:` line naming problem and fix, no
traceback, and no output folder (nor temporary sibling) left behind. Plus one successful run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_tiny_model, tiny_config

from llmc.cli import main
from llmc.errors import LlmcError

RTN_W4 = {"method": "RTN", "weight": {"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 32}}
RTN_W8A8_STATIC = {
    "method": "RTN",
    "weight": {"bit": 8, "symmetric": True, "granularity": "per_channel", "group_size": -1},
    "act": {"bit": 8, "symmetric": True, "granularity": "per_tensor", "static": True},
}


def save_section(tmp_path: Path, **extra) -> dict:
    return {"save_path": str(tmp_path / "out"), "save_fake": True, **extra}


def write_config(tmp_path: Path, cfg: dict | str) -> Path:
    path = tmp_path / "config.yml"
    path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def run(capsys, config: Path, *extra: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["run", str(config), "-q", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def leftovers(save_path: Path) -> list[Path]:
    return sorted(save_path.parent.glob(f".{save_path.name}.tmp-*"))


def assert_bad_input(result: tuple[int, str, str], save_path: Path, *words: str) -> str:
    """Exit 2; stderr ends with exactly one `llmc: error:` line naming `words`; nothing written.

    Other stderr lines (transformers' progress bars) are tolerated here; see test_quiet_means_one_line.
    """
    code, _out, err = result
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("llmc: error:")]
    assert len(errors) == 1, err
    line = errors[0]
    assert line.startswith("llmc: error: ") and err.rstrip("\n").endswith(line), err
    for word in words:
        assert word.lower() in line.lower(), (word, line)
    assert not save_path.exists(), f"{save_path} was written"
    assert leftovers(save_path) == []
    return line


def bad_run(capsys, tmp_path: Path, cfg: dict | str, *words: str, extra: tuple[str, ...] = ()) -> str:
    return assert_bad_input(run(capsys, write_config(tmp_path, cfg), *extra), tmp_path / "out", *words)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny matmuls are fastest on one thread (and several threads crawl on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- model folders


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tiny_tokenizer), n_positions=256, n_embd=32, n_layer=1, n_head=2)
    folder = tmp_path_factory.mktemp("models") / "tiny-gpt2"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def nonfinite_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny Llama whose embedding holds inf and NaN for every token."""
    model = build_tiny_model("llama", len(tiny_tokenizer))
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, 0] = float("inf")
        emb[::2, 1] = float("nan")
    folder = tmp_path_factory.mktemp("models") / "tiny-llama-nonfinite"
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def small_text(tmp_path_factory) -> str:
    """A short text file (tokenizing all of a bundled WikiText-2 split takes about a second)."""
    from llmc.data import bundled_path, read_documents

    path = tmp_path_factory.mktemp("data") / "small.txt"
    path.write_text("\n".join(read_documents(bundled_path("wikitext2", "calib"))[:150]), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def small_eval(small_text) -> dict:
    return {"eval_pos": ["pretrain", "fake_quant"], "name": "custom", "path": small_text, "seq_len": 128,
            "max_windows": 2}


@pytest.fixture(scope="module")
def small_calib(small_text) -> dict:
    return {"name": "custom", "path": small_text, "n_samples": 4, "seq_len": 64, "bs": 2}


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Fail the test if calibration, quantization or evaluation starts."""
    import llmc.runner

    def forbidden(*_a, **_k):
        raise AssertionError("heavy work started before the input was checked")

    for name in ("build_calibration", "compress_model", "evaluate_perplexity"):
        monkeypatch.setattr(llmc.runner, name, forbidden)


# ---------------------------------------------------------------- config problems


def test_malformed_yaml(capsys, tmp_path, tiny_llama_dir):
    text = f"model:\n  path: {tiny_llama_dir}\n quant: [\nsave: {{save_path: {tmp_path / 'out'}}}\n"
    line = bad_run(capsys, tmp_path, text, "malformed YAML", "config.yml", "line 3", "fix")
    assert "ScannerError" not in line and "ParserError" not in line


def test_config_file_missing(capsys, tmp_path):
    result = run(capsys, tmp_path / "nope.yml")
    assert_bad_input(result, tmp_path / "out", "nope.yml", "not found", "existing YAML file")


def test_unknown_key(capsys, tmp_path, tiny_llama_dir):
    quant = {"method": "RTN", "weight": {"bit": 4, "granularity": "per_channel", "group_size": -1, "symetric": True}}
    cfg = tiny_config(tiny_llama_dir, quant=quant, save=save_section(tmp_path))
    bad_run(capsys, tmp_path, cfg, "unknown key 'quant.weight.symetric'", "did you mean 'symmetric'")


@pytest.mark.parametrize("section", ["weight", "act"])
def test_bit_9(capsys, tmp_path, tiny_llama_dir, section):
    quant = {"method": "RTN", "weight": {"bit": 4, "granularity": "per_channel", "group_size": -1}}
    quant[section] = {**quant.get(section, {}), "bit": 9}
    cfg = tiny_config(tiny_llama_dir, quant=quant, save=save_section(tmp_path))
    bad_run(capsys, tmp_path, cfg, f"quant.{section}.bit", "bit=9", "2..8", "use an integer bit width")


def test_bit_9_through_set(capsys, tmp_path, tiny_llama_dir):
    cfg = tiny_config(tiny_llama_dir, quant=RTN_W4, save=save_section(tmp_path))
    result = run(capsys, write_config(tmp_path, cfg), "--set", "quant.weight.bit=9")
    assert_bad_input(result, tmp_path / "out", "quant.weight.bit", "2..8")


def test_set_without_equals(capsys, tmp_path, tiny_llama_dir):
    cfg = tiny_config(tiny_llama_dir, quant=RTN_W4, save=save_section(tmp_path))
    result = run(capsys, write_config(tmp_path, cfg), "--set", "quant.weight.bit")
    assert_bad_input(result, tmp_path / "out", "--set", "key=value")


def test_unknown_method(capsys, tmp_path, tiny_llama_dir):
    cfg = tiny_config(tiny_llama_dir, quant={**RTN_W4, "method": "RTNN"}, save=save_section(tmp_path))
    bad_run(capsys, tmp_path, cfg, "quant.method", "'RTNN'", "did you mean 'RTN'")


def test_save_fake_without_save_path(capsys, tmp_path, tiny_llama_dir):
    cfg = tiny_config(tiny_llama_dir, quant=RTN_W4, save={"save_fake": True})
    bad_run(capsys, tmp_path, cfg, "save.save_path")


# ---------------------------------------------------------------- model problems


def test_group_size_not_dividing_features(capsys, tmp_path, tiny_model_dir, no_heavy_work):
    quant = {**RTN_W8A8_STATIC, "weight": {"bit": 4, "granularity": "per_group", "group_size": 48}}
    cfg = tiny_config(tiny_model_dir, quant=quant, save=save_section(tmp_path))
    line = bad_run(capsys, tmp_path, cfg, "group_size 48", "does not divide", "input features", "partial_group")
    assert "64" in line or "128" in line


def test_group_size_check_respects_ignored_layers(capsys, tmp_path, tiny_llama_dir):
    """group_size 128 divides only the down projections' 128 features; the others are ignored."""
    quant = {
        "method": "RTN", "weight": {"bit": 4, "granularity": "per_group", "group_size": 128},
        "ignored_layers": {"layer_names": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                           "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"]},
    }
    cfg = tiny_config(tiny_llama_dir, quant=quant, eval=None, save={"save_path": str(tmp_path / "out")})
    code, _, err = run(capsys, write_config(tmp_path, cfg))
    assert code == 0, err
    assert (tmp_path / "out" / "results.json").is_file()
    quant["ignored_layers"]["layer_names"].remove("mlp.up_proj")
    cfg["save"] = {"save_path": str(tmp_path / "out2")}
    result = run(capsys, write_config(tmp_path, cfg))
    assert_bad_input(result, tmp_path / "out2", "model.layers.0.mlp.up_proj", "group_size 128", "64 input")


def test_missing_model_path(capsys, tmp_path, no_heavy_work):
    cfg = tiny_config(tmp_path / "no-such-model", quant=RTN_W4, save=save_section(tmp_path))
    bad_run(capsys, tmp_path, cfg, "model path", "no-such-model", "not found", "set model.path")


def test_model_folder_without_config(capsys, tmp_path, no_heavy_work):
    (tmp_path / "empty-model").mkdir()
    cfg = tiny_config(tmp_path / "empty-model", quant=RTN_W4, save=save_section(tmp_path))
    bad_run(capsys, tmp_path, cfg, "empty-model", "config.json")


def test_unsupported_architecture(capsys, tmp_path, tiny_gpt2_dir, no_heavy_work):
    cfg = tiny_config(tiny_gpt2_dir, quant=RTN_W4, save=save_section(tmp_path))
    line = bad_run(capsys, tmp_path, cfg, "gpt2", "adapter")
    assert "unsupported" in line.lower() or "no adapter" in line.lower()
    assert "llama" in line.lower()  # lists what is supported


def test_unknown_model_type(capsys, tmp_path, tiny_llama_dir, no_heavy_work):
    cfg = tiny_config(tiny_llama_dir, quant=RTN_W4, save=save_section(tmp_path))
    cfg["model"]["type"] = "Foo"
    bad_run(capsys, tmp_path, cfg, "no adapter", "'Foo'", "Llama", "auto")


def test_model_type_of_another_architecture(capsys, tmp_path, tiny_opt_dir, no_heavy_work):
    cfg = tiny_config(tiny_opt_dir, quant=RTN_W4, save=save_section(tmp_path))
    cfg["model"]["type"] = "Llama"
    bad_run(capsys, tmp_path, cfg, "adapter Llama", "model.type")


# ---------------------------------------------------------------- data problems


def test_missing_calibration_file(capsys, tmp_path, tiny_llama_dir, no_heavy_work):
    cfg = tiny_config(tiny_llama_dir, quant=RTN_W8A8_STATIC, save=save_section(tmp_path))
    cfg["calib"]["path"] = str(tmp_path / "calib-missing.jsonl")
    bad_run(capsys, tmp_path, cfg, "calib-missing.jsonl", "not found", "set calib.path")


def test_static_activations_without_calib_section(capsys, tmp_path, tiny_llama_dir, no_heavy_work):
    cfg = tiny_config(tiny_llama_dir, quant=RTN_W8A8_STATIC, save=save_section(tmp_path))
    del cfg["calib"]
    bad_run(capsys, tmp_path, cfg, "calib")


def test_missing_eval_file(capsys, tmp_path, tiny_llama_dir, no_heavy_work):
    cfg = tiny_config(tiny_llama_dir, quant=RTN_W4, save=save_section(tmp_path))
    cfg["eval"]["path"] = str(tmp_path / "eval-missing.raw")
    bad_run(capsys, tmp_path, cfg, "eval-missing.raw", "not found", "eval.path")


def test_empty_calibration_file(capsys, tmp_path, tiny_llama_dir, no_heavy_work):
    (tmp_path / "calib.txt").write_text("\n   \n", encoding="utf-8")
    cfg = tiny_config(tiny_llama_dir, quant=RTN_W8A8_STATIC, save=save_section(tmp_path))
    cfg["calib"].update(name="custom", path=str(tmp_path / "calib.txt"))
    bad_run(capsys, tmp_path, cfg, "calib.txt", "calib.path")


@pytest.mark.parametrize("section", ["eval", "calib"])
def test_seq_len_beyond_position_table(capsys, tmp_path, tiny_opt_dir, small_calib, section):
    if section == "calib":
        cfg = tiny_config(tiny_opt_dir, quant=RTN_W8A8_STATIC, calib=dict(small_calib), eval=None,
                          save=save_section(tmp_path))
    else:
        cfg = tiny_config(tiny_opt_dir, quant=RTN_W4, save=save_section(tmp_path))
        cfg["eval"]["max_windows"] = 1
    cfg[section]["seq_len"] = 1024  # the tiny OPT has 512 positions
    bad_run(capsys, tmp_path, cfg, f"{section}.seq_len", "512")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(capsys, tmp_path, tiny_llama_dir, no_heavy_work):
    cfg = tiny_config(tiny_llama_dir, quant=RTN_W4, save=save_section(tmp_path))
    cfg["base"]["device"] = "cuda"
    bad_run(capsys, tmp_path, cfg, "base.device", "CUDA is not available", "cpu")


# ---------------------------------------------------------------- numerics


def test_nonfinite_activations_in_evaluation(capsys, tmp_path, nonfinite_llama_dir, small_eval):
    cfg = tiny_config(nonfinite_llama_dir, quant=RTN_W4, eval=small_eval, save=save_section(tmp_path))
    bad_run(capsys, tmp_path, cfg, "NaN/Inf", "evaluation", "torch_dtype")


def test_nonfinite_activations_in_calibration(capsys, tmp_path, nonfinite_llama_dir, small_calib):
    cfg = tiny_config(nonfinite_llama_dir, quant=RTN_W8A8_STATIC, calib=small_calib, eval=None,
                      save=save_section(tmp_path))
    bad_run(capsys, tmp_path, cfg, "NaN/Inf", "block 0", "calibration data")


# ---------------------------------------------------------------- outputs


def test_existing_save_path_without_overwrite(capsys, tmp_path, tiny_llama_dir, no_heavy_work):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious", encoding="utf-8")
    cfg = tiny_config(tiny_llama_dir, quant=RTN_W4, save=save_section(tmp_path))
    code, _, err = run(capsys, write_config(tmp_path, cfg))
    assert code == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("llmc: error: ")
    assert "already exists" in lines[0] and "save.overwrite: true" in lines[0]
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text(encoding="utf-8") == "precious"
    assert leftovers(out) == []


def test_save_path_below_a_file(capsys, tmp_path, tiny_llama_dir, no_heavy_work):
    (tmp_path / "afile").write_text("x", encoding="utf-8")
    cfg = tiny_config(tiny_llama_dir, quant=RTN_W4, eval=None, save={"save_path": str(tmp_path / "afile" / "out")})
    result = run(capsys, write_config(tmp_path, cfg))
    assert_bad_input(result, tmp_path / "afile" / "out", "save.save_path", "afile")
    assert (tmp_path / "afile").read_text(encoding="utf-8") == "x"


def test_quiet_means_one_line(capsys, tmp_path, nonfinite_llama_dir, small_eval):
    cfg = tiny_config(nonfinite_llama_dir, quant=RTN_W4, eval=small_eval, save=save_section(tmp_path))
    code, out, err = run(capsys, write_config(tmp_path, cfg))
    assert code == 2
    assert err.splitlines() == [line for line in err.splitlines() if line.startswith("llmc: error: ")] != []


@pytest.mark.parametrize("exc,code", [(LlmcError("disk full; free some space"), 2), (KeyboardInterrupt(), 130)])
def test_failure_while_saving_leaves_nothing(capsys, tmp_path, tiny_llama_dir, monkeypatch, exc, code):
    import llmc.runner

    def failing_save(*_a, **_k):
        raise exc

    monkeypatch.setattr(llmc.runner, "save_hf_model", failing_save)
    cfg = tiny_config(tiny_llama_dir, quant=RTN_W4, eval=None, save=save_section(tmp_path))
    got, _, err = run(capsys, write_config(tmp_path, cfg))
    assert got == code and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path / "out") == []


def test_end_to_end_success(capsys, tmp_path, tiny_llama_dir):
    cfg = tiny_config(tiny_llama_dir, quant=RTN_W4, save=save_section(tmp_path))
    code, out, err = run(capsys, write_config(tmp_path, cfg))
    assert code == 0, err
    assert "llmc: error" not in err and "Traceback" not in err
    save_path = tmp_path / "out"
    results = json.loads((save_path / "results.json").read_text(encoding="utf-8"))
    ppl = {(r["position"], r["dataset"]): r for r in results["perplexity"]}
    assert set(ppl) == {("pretrain", "wikitext2"), ("fake_quant", "wikitext2")}
    for r in ppl.values():
        assert math.isfinite(r["ppl"]) and r["ppl"] > 1 and r["windows"] == 4 and r["seq_len"] == 128
        assert r["tokens_scored"] == 4 * 127
    assert ppl["pretrain", "wikitext2"]["ppl"] != ppl["fake_quant", "wikitext2"]["ppl"]
    assert results["config"]["quant"]["weight"]["group_size"] == 32 and results["seed"] == 0
    assert (save_path / "fake_quant_model" / "config.json").is_file()
    assert not (save_path / "transformed_model").exists()
    assert leftovers(save_path) == []
    assert "fake_quant" in out and "pretrain" in out  # the perplexity table
    # A second run refuses the now-existing folder, then overwrites it when asked.
    assert run(capsys, write_config(tmp_path, cfg))[0] == 2
    code, _, err = run(capsys, write_config(tmp_path, cfg), "--set", "save.overwrite=true")
    assert code == 0, err
    again = json.loads((save_path / "results.json").read_text(encoding="utf-8"))
    assert [r["ppl"] for r in again["perplexity"]] == [r["ppl"] for r in results["perplexity"]]
    assert leftovers(save_path) == []
