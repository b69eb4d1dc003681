"""Resume: a run stopped after some blocks continues from its checkpoint, and its saved models are
byte-identical to an uninterrupted run's; a SIGKILLed `llmc run` resumes too."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_config

import llmc.schedule
from llmc import compress
from llmc.errors import ConfigError
from llmc.pipeline.checkpoint import checkpoint_folder

pytestmark = pytest.mark.reliability("resume")

W4_GPTQ = {"method": "GPTQ", "weight": {"bit": 4, "granularity": "per_group", "group_size": 32},
           "special": {"actorder": True, "static_groups": False}}
CASES = {
    "rtn": {"quant": {"method": "RTN", "weight": {"bit": 4, "granularity": "per_group", "group_size": 32}}},
    "gptq_actorder": {"quant": W4_GPTQ},
    "smoothquant_static": {"quant": {"method": "SmoothQuant", "weight": {"bit": 8, "granularity": "per_channel"},
                                     "act": {"bit": 8, "granularity": "per_tensor", "static": True}}},
    "wanda_owl_gptq": {"sparse": {"method": "Wanda", "weight": {"sparsity": 0.5, "layer_sparsity": "owl"}},
                       "quant": W4_GPTQ},
    "sparsegpt_24": {"sparse": {"method": "SparseGPT", "weight": {"pattern": "2:4"}}},
    "shortgpt": {"sparse": {"method": "ShortGPT", "weight": {"n_prune_layers": 1}}},
}


def digests(out: Path) -> dict[str, str]:
    """sha256 of every saved file but results.json (it holds timings)."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and p.name != "results.json"}


def config(model_dir: Path, out: Path, case: str) -> dict:
    return tiny_config(model_dir, **CASES[case],
                       save={"save_fake": True, "save_trans": True, "save_path": str(out)})


class Crash(Exception):
    pass


def crash_at(monkeypatch, point: str) -> None:
    def kill(name: str) -> None:
        if name == point:
            raise Crash(name)

    monkeypatch.setattr(llmc.schedule, "kill_point", kill)


@pytest.mark.parametrize("case", [c for c in CASES if c != "rtn"])
def test_resumed_run_is_byte_identical(tiny_llama_dir, tmp_path, monkeypatch, case):
    whole = compress(config(tiny_llama_dir, tmp_path / "whole", case), progress=False)
    out = tmp_path / "resumed"
    crash_at(monkeypatch, "block:2")
    with pytest.raises(Crash):
        compress(config(tiny_llama_dir, out, case), progress=False)
    folder = checkpoint_folder(out)
    assert json.loads((folder / "state.json").read_text())["done"] == 1
    assert not out.exists()
    monkeypatch.undo()
    resumed = compress(config(tiny_llama_dir, out, case), progress=False, resume="require")
    assert digests(out) == digests(tmp_path / "whole")
    assert [r.ppl for r in resumed.perplexity] == [r.ppl for r in whole.perplexity]
    assert [m for m in resumed.methods] == [m for m in whole.methods]
    assert not folder.exists()  # removed once the outputs are written


def test_checkpoint_of_another_config_is_not_resumed(tiny_llama_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    crash_at(monkeypatch, "block:1")
    with pytest.raises(Crash):
        compress(config(tiny_llama_dir, out, "rtn"), progress=False)
    monkeypatch.undo()
    other = config(tiny_llama_dir, out, "rtn")
    other["quant"]["weight"]["bit"] = 3
    with pytest.raises(ConfigError, match="another config"):
        compress(other, progress=False, resume="require")
    compress(other, progress=False)  # auto: the stale checkpoint is dropped, the run starts over
    assert (out / "results.json").exists() and not checkpoint_folder(out).exists()


def test_resume_without_checkpoint_is_one_clear_error(tiny_llama_dir, tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint"):
        compress(config(tiny_llama_dir, tmp_path / "out", "rtn"), progress=False, resume="require")


def test_no_checkpoint_when_disabled(tiny_llama_dir, tmp_path, monkeypatch):
    cfg = config(tiny_llama_dir, tmp_path / "out", "rtn")
    cfg["save"]["checkpoint"] = False
    crash_at(monkeypatch, "block:1")
    with pytest.raises(Crash):
        compress(cfg, progress=False)
    assert not checkpoint_folder(tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("point", ["block:2", "save"])
def test_sigkilled_run_resumes_byte_identical(tiny_llama_dir, tmp_path, point):
    """A real `llmc run` process is SIGKILLed (during block k, or while writing the outputs), then
    `llmc run --resume` finishes it: the saved models equal an uninterrupted run's."""
    case = "gptq_actorder"
    compress(config(tiny_llama_dir, tmp_path / "whole", case), progress=False)
    out = tmp_path / "out"
    conf = tmp_path / "run.yml"
    conf.write_text(yaml.safe_dump(config(tiny_llama_dir, out, case)))
    cmd = [sys.executable, "-m", "llmc", "run", str(conf), "-q"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "LLMC_TEST_KILL_AT": point}
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    assert not out.exists()
    env.pop("LLMC_TEST_KILL_AT")
    # Block k-1's checkpoint is written while block k computes: a kill during block k finds it
    # written, or finds block k-2's (nothing, for k = 1).
    state = checkpoint_folder(out) / "state.json"
    done = json.loads(state.read_text())["done"] if state.exists() else None
    k = int(point.split(":")[1]) if point.startswith("block:") else 3
    assert done == k - 1 or (k < 3 and done == (k - 2 if k > 1 else None)), done
    resumed = subprocess.run([*cmd, "--resume"] if done is not None else cmd, env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert digests(out) == digests(tmp_path / "whole")
    assert json.loads((out / "results.json").read_text())["resumed_after_block"] == done
    assert not checkpoint_folder(out).exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")]
