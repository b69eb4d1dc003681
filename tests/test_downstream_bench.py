"""benchmarks/downstream.py (issue 16's benchmark): its rows' llmc configs, the table it renders, which
rows --resume runs again, and one real row end to end on a tiny model (results.json, md, report plots)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import downstream as bench  # noqa: E402

from llmc.config import load_config  # noqa: E402


def _args(tmp_path: Path, *extra: str):
    return bench.parse_args(["--out", str(tmp_path / "ds"), *extra])


def _row(setting: str, method: str, limit=None, scale: float = 1.0) -> dict:
    tasks = {t: {"samples": 10, m: 0.5 * scale, f"{m}_stderr": 0.01} for t, m in bench.METRIC.items()}
    tasks["piqa"]["acc"] = 0.9  # not piqa's reported metric (acc_norm)
    tasks["lambada_openai"].update(perplexity=12.345, perplexity_stderr=0.5)
    return {"setting": setting, "method": method, "limit": limit, "ppl": 20.0, "quantize_s": 1.0, "tasks_s": 3.0,
            "quant_out": True, "device": "cpu", "commit": "abc1234", "tasks": tasks, "run_dir": "x"}


def test_plan_matches_the_accuracy_table():
    rows = bench.plan()
    assert [(s, m) for s, m, _ in rows][:5] == [("FP32", "FP"), ("W4A16 g128", "RTN"), ("W4A16 g128", "GPTQ"),
                                                ("W4A16 g128", "AWQ"), ("W4A16 g128", "AWQ+GPTQ")]
    assert len(rows) == 9 and {s for s, _, _ in rows} == {"FP32", "W4A16 g128", "W3A16 g128"}
    specs = {(s, m): spec for s, m, spec in rows}
    w3 = specs[("W3A16 g128", "GPTQ")]["quant"]
    assert w3["weight"] == {"bit": 3, "symmetric": False, "granularity": "per_group", "group_size": 128,
                            "partial_group": True}
    assert w3["special"] == {"actorder": True, "static_groups": True}
    assert specs[("W4A16 g128", "AWQ+GPTQ")]["quant"]["special"] == {"GPTQ": w3["special"]}
    assert len({bench.slug(s, m) for s, m, _ in rows}) == 9


def test_row_configs_load(tmp_path):
    args = _args(tmp_path, "--limit", "7")
    args.model_dir = tmp_path
    for setting, method, spec in bench.plan():
        cfg = load_config(bench.row_config(args, spec, tmp_path / bench.slug(setting, method)))
        assert cfg.eval.eval_pos == (["pretrain"] if setting == "FP32" else ["fake_quant"])
        assert cfg.eval.tasks == list(bench.TASKS) and cfg.eval.limit == 7 and cfg.eval.tasks_bs == 64
        assert (cfg.calib.n_samples, cfg.calib.seq_len) == (128, 512)
        assert not cfg.save.save_fake and not cfg.save.save_trans and not cfg.save.checkpoint


def test_render_table():
    header = {"environment": {"device": "cpu", "torch": "t", "transformers": "tr", "lm_eval": "0.4.13",
                              "llmc": "0.1.0"}, "model": "m", "methods": "x", "calibration": "c", "tasks": "t",
              "limit": None, "evaluation": "e", "command": "python x", "report": "downstream_report"}
    rows = [_row("FP32", "FP"), _row("W3A16 g128", "RTN", scale=0.8),
            {"setting": "W3A16 g128", "method": "GPTQ", "error": "RuntimeError: boom"}]
    md = bench.render(header, rows, ["downstream_report/plots/tasks.png"])
    lines = md.splitlines()
    table = [ln for ln in lines if ln.startswith("| ")]
    assert table[0].startswith("| setting | method | quant_out | piqa acc_norm | lambada_openai acc |")
    assert table[1].count("|") == table[0].count("|") == table[2].count("|") == table[4].count("|")
    fp = table[2].split(" | ")
    assert fp[3] == "50.00 ± 1.00" and "12.35 ± 0.50" in fp and "50.00" in fp[9]  # acc_norm, not piqa's acc 0.9
    assert table[3].split(" | ")[9] == "40.00"  # mean of 0.4 x 5
    assert "error: RuntimeError: boom" in table[4]
    assert "limit: full splits" in md and "![tasks](downstream_report/plots/tasks.png)" in md
    assert "first 5 examples per task" in bench.render({**header, "limit": 5}, rows, [])


def test_resume_skips_rows_measured_at_the_same_limit(tmp_path):
    done = [_row("FP32", "FP", limit=10), _row("W4A16 g128", "RTN", limit=None),
            {"setting": "W4A16 g128", "method": "GPTQ", "limit": 10, "error": "x"}]
    todo = [(s, m) for s, m, _ in bench.pending(done, _args(tmp_path, "--limit", "10"))]
    assert ("FP32", "FP") not in todo and ("W4A16 g128", "RTN") in todo and ("W4A16 g128", "GPTQ") in todo
    assert len(todo) == 8
    only = bench.pending(done, _args(tmp_path, "--limit", "10", "--only", "FP32,W3A16 g128/AWQ"))
    assert [(s, m) for s, m, _ in only] == [("W3A16 g128", "AWQ")]
    redo = bench.pending(done, _args(tmp_path, "--limit", "10", "--only", "FP32", "--redo"))
    assert [(s, m) for s, m, _ in redo] == [("FP32", "FP")]


def test_one_row_end_to_end(tmp_path, tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(bench, "TASKS", ("piqa", "lambada_openai"))  # the other three only cost time here
    # accuracy.py's helper (the calibration ids' hash for the header) tokenizes all of C4: seconds, untested here
    monkeypatch.setattr(bench, "prepare_files", lambda *a: {"calib_sha256_16": "0" * 16})
    common = ["--out", str(tmp_path / "downstream_smollm2"), "--model-dir", str(tiny_llama_dir), "--model-type",
              "auto", "--device", "cpu", "--limit", "2", "--tasks-bs", "4", "--n-samples", "2", "--calib-seq-len",
              "32", "--windows", "1", "--eval-seq-len", "64"]
    bench.main([*common, "--only", "W4A16 g128/RTN"])
    data = json.loads((tmp_path / "downstream_smollm2.json").read_text())
    (row,) = data["rows"]
    assert set(row["tasks"]) == {"piqa", "lambada_openai"} and row["tasks"]["piqa"]["samples"] == 2
    assert (tmp_path / "downstream_runs" / "w4a16_g128_rtn" / "results.json").is_file()
    plots = data["plots"]
    assert "downstream_report/plots/tasks.png" in plots
    for p in plots:
        assert (tmp_path / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| W4A16 g128 | RTN |" in (tmp_path / "downstream_smollm2.md").read_text()
    with pytest.raises(SystemExit, match="limit 2, not 3"):
        bench.main([*common, "--limit", "3", "--resume"])  # the last --limit wins
