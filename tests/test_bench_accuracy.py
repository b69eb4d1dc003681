"""The accuracy benchmark's plumbing (benchmarks/accuracy.py, common.py): the issue-14 rows are valid
configs or reported as not available, failures become rows, and the peer gets the right recipe."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import accuracy  # noqa: E402
import common  # noqa: E402

from llmc.config import load_config  # noqa: E402
from llmc.schedule import build_methods  # noqa: E402


def rows_by_key():
    return {(s, m): spec for s, m, spec in accuracy.rotations_plan()}


def test_rotation_rows_are_valid_configs_or_not_available():
    plan = accuracy.rotations_plan()
    assert len({(s, m) for s, m, _ in plan}) == len(plan)
    checked = 0
    for setting, method, spec in plan:
        if not spec or accuracy.unavailable(spec):
            continue
        cfg = load_config({"model": {"path": "unused"}, **accuracy.llmc_spec(spec)})
        assert build_methods(cfg), (setting, method)
        checked += 1
    assert checked >= 6  # RTN, SmoothQuant, GPTQ, AWQ rows exist today


def test_unavailable_names_the_missing_method(monkeypatch):
    monkeypatch.setattr(accuracy, "METHODS", {"rtn": object(), "gptq": object()})
    spec = rows_by_key()[("W4A4", "QuaRot+GPTQ")]
    assert accuracy.unavailable(spec) == "not available: QuaRot not registered in llmc"
    assert accuracy.unavailable(rows_by_key()[("W4A4", "RTN")]) is None
    assert accuracy.unavailable(rows_by_key()[("W4A4", "QuIP (llm-compressor)")]) == "llm-compressor only"


def test_failed_run_becomes_a_row(monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("singular Hessian\nmore")

    monkeypatch.setattr(accuracy, "llmc_run", boom)
    row = accuracy.run_row(Path("unused"), SimpleNamespace(), "W4A4", "RTN", rows_by_key()[("W4A4", "RTN")])
    assert row["error"] == "RuntimeError: singular Hessian"
    assert "ppl" not in row


def test_peer_command_carries_the_rotation_and_method(monkeypatch):
    seen = []

    def fake_run(cmd, **kwargs):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps({"ppl": 1.0}) + "\n", stderr="")

    monkeypatch.setattr(common.subprocess, "run", fake_run)
    args = SimpleNamespace(peer_python="python", device_name="cpu")
    files = {"calib": "c.pt", "windows": "w.pt"}
    spec = rows_by_key()[("W4A4", "QuaRot+GPTQ")]
    assert common.peer_run(Path("m"), args, files, "W4A4", "QuaRot+GPTQ", spec) == {"ppl": 1.0}
    cmd = " ".join(seen[-1])
    assert "--method GPTQ" in cmd and "--transform SpinQuant" in cmd and "--actorder static" in cmd
    assert "--bits 4 --group-size -1" in cmd and "--act-bits 4" in cmd and "--asym" not in cmd
    common.peer_run(Path("m"), args, files, "W4A4", "RTN", rows_by_key()[("W4A4", "RTN")])
    assert "--transform" not in seen[-1] and "RTN" in seen[-1]


def test_rotations_table_renders_every_kind_of_row(tmp_path):
    env = {"device": "cpu", "torch": "t", "transformers": "x", "llmc": "0"}
    header = {"table": "rotations", "environment": env, "calibration": "c", "evaluation": "e", "command": "c"}
    peer = {"ppl": 30.0, "quantize_s": 2.0, "recipe": ["SpinQuantModifier", "QuantizationModifier"],
            "quantized_linears": "210/210", "act_quant_fired": "210/210", "online_transforms": 30,
            "logits_rel_change": 0.2}
    rows = [
        {"setting": "W4A4", "method": "QuaRot", "unavailable": "not available: QuaRot not registered in llmc",
         "peer": peer},
        {"setting": "W4A4", "method": "RTN", "error": "ConfigError: bad"},
        {"setting": "W4A4", "method": "SmoothQuant", "ppl": 100.0, "quantize_s": 1.0, "quant_out": False},
    ]
    accuracy.write(tmp_path / "t", header, rows)
    md = (tmp_path / "t.md").read_text()
    assert "| W4A4 | QuaRot | false | not available: QuaRot not registered in llmc |  | 30.000 | 2.0 | " in md
    assert "SpinQuantModifier + QuantizationModifier; quantized 210/210" in md
    assert "error: ConfigError: bad" in md and "| 100.000 | 1.0 |" in md
    assert json.loads((tmp_path / "t.json").read_text())["rows"] == rows


@pytest.mark.parametrize("table", ["main", "rotations", "formats"])
def test_every_table_starts_with_the_float_row(table):
    plan = accuracy.TABLES[table][0]()
    assert plan[0] == ("FP32", "FP", {})
    assert len({(setting, method) for setting, method, _ in plan}) == len(plan)  # rows are keyed by these
    assert not [label for setting, method, _ in plan for label in (setting, method) if "," in label]  # --only splits


@pytest.mark.parametrize("table", ["rotations", "formats"])
def test_every_llmc_row_loads_and_builds_its_methods(table):
    """A bad key or a refused combination fails here, not after minutes of device time."""
    for *_, spec in accuracy.TABLES[table][0]()[1:]:
        if accuracy.unavailable(spec) is None:
            accuracy.resolved_quant_out(spec)  # load_config + build_methods


def test_resume_reruns_missing_llmc_rows_and_keeps_the_peer(tmp_path, monkeypatch):
    """First pass: QuaRot is not registered (row not available, peer runs). Second pass with --resume after
    it is registered: llmc's part runs, the peer's earlier result is kept, finished rows are skipped."""
    calls = {"llmc": [], "peer": []}
    monkeypatch.setattr(accuracy, "smollm2_hf_dir", lambda: Path("m"))
    monkeypatch.setattr(accuracy, "prepare_files", lambda *a: {"calib_sha256_16": "0"})
    monkeypatch.setattr(accuracy, "environment", lambda: {"device": "cpu", "torch": "t", "transformers": "x",
                                                          "llmc": "0", "commit": "c"})
    monkeypatch.setattr(accuracy, "resolved_quant_out", lambda spec: False)

    def llmc_run(model_dir, args, spec):
        calls["llmc"].append(spec["quant"]["method"] if spec else "FP")
        return {"ppl": 10.0, "quantize_s": 1.0, "windows": args.windows}

    def peer_run(model_dir, args, files, setting, method, spec):
        calls["peer"].append(method)
        return {"ppl": 11.0, "quantize_s": 2.0}

    monkeypatch.setattr(accuracy, "llmc_run", llmc_run)
    monkeypatch.setattr(accuracy, "peer_run", peer_run)
    out = tmp_path / "rot"
    argv = ["accuracy.py", "--table", "rotations", "--only", "W4A4/RTN,W4A4/QuaRot", "--peer-python", "py",
            "--out", str(out), "--resume"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(accuracy, "METHODS", {"rtn": object()})
    accuracy.main()
    assert calls == {"llmc": ["RTN"], "peer": ["RTN", "QuaRot"]}
    rows = {r["method"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    assert rows["QuaRot"]["unavailable"].startswith("not available") and rows["QuaRot"]["peer"]["ppl"] == 11.0

    monkeypatch.setattr(accuracy, "METHODS", {"rtn": object(), "quarot": object()})
    accuracy.main()
    assert calls == {"llmc": ["RTN", "QuaRot"], "peer": ["RTN", "QuaRot"]}
    rows = {r["method"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    assert rows["QuaRot"]["ppl"] == 10.0 and rows["QuaRot"]["peer"]["ppl"] == 11.0
    assert [r["method"] for r in json.loads(out.with_suffix(".json").read_text())["rows"]] == ["RTN", "QuaRot"]
