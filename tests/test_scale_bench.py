"""benchmarks/scale.py (issue 17's benchmark runner) on CPU with the 'tiny' shape: a 1-process row, the
same row data-parallel over 2 gloo processes under torchrun with its agreement against the 1-process
weights, and a disk-streamed row built shard by shard; rows are written and rendered, --resume runs
nothing twice, and the helpers that judge the GPU rows (agreement, RSS fit, extrapolation) are right."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import scale  # noqa: E402
import scale_models  # noqa: E402
import scale_report  # noqa: E402

ARGS = ["--rows", "dp,peer,disk", "--shapes", "tiny", "--device", "cpu", "--gpus", "1,2", "--runs", "gptq",
        "--peer", "", "--host-shape", "tiny", "--disk-layers", "3", "--n-samples", "8", "--seq-len", "32",
        "--bs", "2"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("scale")
    out = work / "scale_test"
    paths = ["--out", str(out), "--model-root", str(work / "models"), "--work", str(work / "rows")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale.py"), *ARGS, *paths], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.with_suffix(".json").read_text())
    return {"out": out, "paths": paths, "data": data, "rows": {r["key"]: r for r in data["rows"]}}


def test_rows_written_and_rendered(bench):
    rows = bench["rows"]
    assert set(rows) == {"dp/tiny/gptq/1gpu", "dp/tiny/gptq/2gpu", "disk/tiny/3l/gptq/stream"}
    for row in rows.values():
        assert "error" not in row, row
        assert row["seconds"] > 0 and row["rss_gib"] > 0.05 and row["blocks"] == row["layers"]
    md = bench["out"].with_suffix(".md").read_text()
    assert all(f"| {key} |" in md for key in rows)
    assert "vs 1 GPU:" in md and "Disk-streamed tiny with 3 layers" in md


def test_two_process_row_is_data_parallel_and_agrees(bench):
    one, two = bench["rows"]["dp/tiny/gptq/1gpu"], bench["rows"]["dp/tiny/gptq/2gpu"]
    assert one["gpus"] == 1 and len(one["ranks"]) == 1
    assert two["gpus"] == 2 and len(two["ranks"]) == 2  # both ranks reported (gloo: the driver picked it on CPU)
    ag = two["agreement"]
    assert ag["probes"] == 4  # q_proj and down_proj of the first and last block
    assert ag["frac_differ"] < 0.01 and ag["max_abs"] < 0.05 * ag["weight_absmax"]


def test_streamed_row_reads_the_sharded_checkpoint(bench):
    row = bench["rows"]["disk/tiny/3l/gptq/stream"]
    assert row["stream"] and row["layers"] == 3 and row["cache_dropped"]
    folder = Path(bench["paths"][3]) / "tiny-3l-sharded"
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert index["model.layers.2.mlp.down_proj.weight"] == "layer-00002.safetensors"
    assert all((folder / f).is_symlink() for f in set(index.values()))


def test_resume_runs_nothing_again(bench, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a finished row ran again")

    monkeypatch.setattr(scale, "launch", refuse)
    monkeypatch.setattr(sys, "argv", ["scale.py", *ARGS, *bench["paths"], "--resume"])
    scale.main()
    data = json.loads(bench["out"].with_suffix(".json").read_text())
    assert [r["key"] for r in data["rows"]] == [r["key"] for r in bench["data"]["rows"]]
    assert len(data["commands"]) == 2
    # a new row that the budget cannot hold (RTN's guess: 47 s) is left for the next call, not started
    monkeypatch.setattr(sys, "argv", ["scale.py", *ARGS, *bench["paths"], "--resume", "--runs", "gptq,rtn",
                                      "--budget-s", "40"])
    scale.main()
    data = json.loads(bench["out"].with_suffix(".json").read_text())
    assert [r["key"] for r in data["rows"]] == [r["key"] for r in bench["data"]["rows"]]


def test_agreement_sees_a_moved_weight(tmp_path):
    w = {"0.self_attn.q_proj": torch.linspace(-1, 1, 100).reshape(10, 10)}
    torch.save(w, tmp_path / "a.pt")
    moved = {k: v.clone() for k, v in w.items()}
    moved["0.self_attn.q_proj"][3, 4] += 0.125
    torch.save(moved, tmp_path / "b.pt")
    same = scale_report.agreement(tmp_path / "a.pt", tmp_path / "a.pt")
    assert same["frac_differ"] == 0 and same["max_abs"] == 0
    diff = scale_report.agreement(tmp_path / "a.pt", tmp_path / "b.pt")
    assert diff["frac_differ"] == pytest.approx(0.01) and diff["max_abs"] == pytest.approx(0.125)


def test_rss_fit_and_time_extrapolation():
    rows = [{"kind": "host", "stream": False, "layers": 2, "rss_gib": 8.0},
            {"kind": "host", "stream": False, "layers": 4, "rss_gib": 11.0},
            {"kind": "host", "stream": True, "layers": 2, "rss_gib": 3.0},
            {"kind": "disk", "stream": True, "layers": 24, "rss_gib": 3.0}]
    slope, at80 = scale_report.rss_fit(rows, False, 80)
    assert slope == pytest.approx(1.5) and at80 == pytest.approx(8.0 + 1.5 * 78)
    assert scale_report.rss_fit(rows, True, 80) == (pytest.approx(0.0), pytest.approx(3.0))
    row = {"seconds": 20.0, "per_block_s": [6.0, 4.0, 4.0]}  # capture 6 s, steady 4 s per block
    assert scale_report.extrapolated_s(row, 80) == pytest.approx(6.0 + 4.0 * 80)


def test_disk_shortfall_names_the_layers_that_fit(tmp_path, monkeypatch):
    import argparse
    import shutil

    bench = scale.Bench.__new__(scale.Bench)
    bench.root = tmp_path
    bench.args = argparse.Namespace()
    dims = scale.SHAPES["llama2-70b"]
    free = 20 * 2**30
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(free, 0, free))
    assert bench.disk_shortfall("llama2-70b", dims, 8) is None
    message = bench.disk_shortfall("llama2-70b", dims, 24)
    rest, layer = scale_models.tensor_shapes(dims)
    fits = (free - 2 * 2**30 - 2 * sum(s.numel() for s in rest.values())) // (2 * sum(s.numel() for s in layer.values()))
    assert message.endswith(f"use --disk-layers {fits} or less") and fits == 10
