"""Accuracy on the real SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI) and real WikiText-2 text.

Protocol: WikiText-2 test, seq_len 2048, the first N_WINDOWS windows (see llmc.eval.perplexity).
One window keeps the file cheap on CI's 2 cores (a 2048-token forward is ~10 s); the margins it
leaves are noted at each claim.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmc import compress
from llmc.data import load_eval_text, tokenize_windows
from llmc.eval.perplexity import evaluate_perplexity

pytestmark = pytest.mark.real_model

N_WINDOWS = 1
SEQ_LEN = 2048
CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]


def _model_section(path: Path) -> dict:
    return {"type": "SmolLM", "path": str(path), "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
            "torch_dtype": "float32"}


@pytest.fixture(scope="module")
def loaded(_real_loaded_once):
    return _real_loaded_once  # read only here (tests/conftest.py loads it once per worker)


@pytest.fixture(scope="module")
def windows(loaded):
    return tokenize_windows(load_eval_text("wikitext2"), loaded.tokenizer, SEQ_LEN, N_WINDOWS)


@pytest.fixture(scope="module")
def reference_nll(loaded, windows):
    """Per-window mean NLL straight from transformers' own loss (labels = input ids)."""
    with torch.no_grad():
        return [loaded.model(w[None], labels=w[None]).loss.double().item() for w in windows]


@pytest.fixture(scope="module")
def pretrain_ppl(loaded, windows, reference_nll):
    result = evaluate_perplexity(loaded.model, loaded.adapter, windows, CPU, progress=False)
    assert result.windows == N_WINDOWS and result.tokens_scored == N_WINDOWS * (SEQ_LEN - 1)
    return result.ppl


def test_pretrain_ppl_equals_transformers(pretrain_ppl, reference_nll):
    assert pretrain_ppl == pytest.approx(math.exp(sum(reference_nll) / len(reference_nll)), rel=1e-5)
    assert 10 < pretrain_ppl < 40  # a real language model, not random weights (measured 15.15 on window 1)


def test_streamed_ppl_equals_transformers(loaded, windows, reference_nll):
    streamed = evaluate_perplexity(loaded.model, loaded.adapter, windows[:1], CPU, inference_per_block=True,
                                   progress=False)
    assert streamed.ppl == pytest.approx(math.exp(reference_nll[0]), rel=1e-5)


def _quantized(path: Path, weight: dict, save: dict | None = None):
    cfg = {
        "model": _model_section(path),
        "eval": {"eval_pos": ["fake_quant"], "seq_len": SEQ_LEN, "max_windows": N_WINDOWS},
        "quant": {"method": "RTN", "weight": weight},
    }
    if save:
        cfg["save"] = save
    return compress(cfg, progress=False)


def test_rtn_w4_g128_below_twice_pretrain_and_saves(real_model_path, pretrain_ppl, windows, tmp_path):
    """RTN W4 g128 on the GGUF-loaded model; its save_fake/save_trans folders load with transformers."""
    from transformers import AutoModelForCausalLM

    from llmc.quant import quant_disabled

    out = tmp_path / "w4"
    result = _quantized(real_model_path, {"bit": 4, "symmetric": False, "granularity": "per_group",
                                          "group_size": 128, "partial_group": True},
                        {"save_fake": True, "save_trans": True, "save_path": str(out)})
    ppl = result.ppl("fake_quant")
    print(f"RTN W4 g128: {ppl:.4f} vs pretrain {pretrain_ppl:.4f}")
    assert pretrain_ppl < ppl < 2 * pretrain_ppl  # window 1: 21.07 vs 15.15 (x1.39)
    ids = windows[:1, :64]
    with torch.no_grad():
        fake = result.model(ids).logits
        with quant_disabled(result.model):
            trans = result.model(ids).logits
        for folder, expected in (("fake_quant_model", fake), ("transformed_model", trans)):
            reloaded = AutoModelForCausalLM.from_pretrained(out / folder, dtype=torch.float32)
            torch.testing.assert_close(reloaded(ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_rtn_w8_per_channel_within_one_percent(real_model_path, pretrain_ppl):
    ppl = _quantized(real_model_path, {"bit": 8, "symmetric": True, "granularity": "per_channel",
                                       "group_size": -1}).ppl("fake_quant")
    print(f"RTN W8 per-channel: {ppl:.4f} vs pretrain {pretrain_ppl:.4f}")
    assert abs(ppl - pretrain_ppl) / pretrain_ppl < 0.01  # window 1: 15.182 vs 15.147 (+0.23%)


@pytest.mark.slow
def test_quickstart_prints_both_numbers(real_model_path, tmp_path):
    """`llmc run configs/quickstart.yml` as a user runs it; its printed table is parsed and checked."""
    out = tmp_path / "quickstart"
    # The worker's thread share (tests/conftest.py): more threads than cores spin against the other worker.
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.run(
        [sys.executable, "-m", "llmc", "run", str(REPO / "configs" / "quickstart.yml"), "-q",
         "--set", f"save.save_path={out}", "--set", f"model.path={real_model_path}",
         "--set", "eval.max_windows=1"],  # the quickstart's 8 windows: 14 more 2048-token forwards on CI
        capture_output=True, text=True, env=env, cwd=REPO, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = dict(re.findall(r"^(pretrain|fake_quant)\s+wikitext2\s+1\s+2048\s+([\d.]+)$", proc.stdout, re.M))
    assert set(rows) == {"pretrain", "fake_quant"}, proc.stdout
    pre, fq = float(rows["pretrain"]), float(rows["fake_quant"])
    assert 10 < pre < 40 and pre < fq < 2 * pre  # RTN as in test_rtn_w4_g128...: 15.15 -> 21.07 on window 1
    saved = json.loads((out / "results.json").read_text())
    assert [round(r["ppl"], 4) for r in saved["perplexity"]] == [pre, fq]
