"""`llmc report`: renders from the committed benchmark JSONs and from a tiny-model run folder; every
plot the markdown links is a real, non-blank PNG; bad inputs are one error line and leave nothing behind;
the pipeline's per-block records (time, output error) that the report plots."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from transformers import AutoModelForCausalLM

import llmc
from llmc.cli import main
from llmc.models import get_adapter
from llmc.pipeline import BlockwisePipeline, capture_block_inputs
from llmc.report import ReportError, load_source, write_report

pytest.importorskip("matplotlib")
from matplotlib.image import imread  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
BENCHMARKS = [RESULTS / "accuracy_smollm2.json", RESULTS / "accuracy_smollm2_rotations.json",
              RESULTS / "speed_llama2_7b_h100.json"]
CPU = torch.device("cpu")


def linked_plots(report: Path) -> list[Path]:
    """The PNGs report.md links, each checked to be a PNG whose pixels are not all one colour."""
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report.read_text())
    paths = [report.parent / link for link in links]
    for path in paths:
        assert path.is_file() and path.stat().st_size > 0, path
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
        pixels = imread(path)
        assert pixels.ndim == 3 and (pixels != pixels[0, 0]).any(), f"{path} is blank"
    return paths


def test_report_from_benchmarks(tmp_path):
    report = write_report(BENCHMARKS, tmp_path / "rep")
    names = {p.name for p in linked_plots(report)}
    assert names == {"ppl_accuracy_smollm2.png", "ppl_accuracy_smollm2_rotations.png", "block_time.png", "speed.png"}
    assert sorted(p.name for p in (report.parent / "plots").iterdir()) == sorted(names)  # nothing unlinked
    text = report.read_text()
    assert "| accuracy_smollm2 | W3A16 g128 | RTN | 110.666 |" in text  # the committed number, as is
    assert "| speed_llama2_7b_h100 | llmc: gptq | 32 | 33.9 | 7.71 | 8.51 |" in text
    assert [p.name for p in tmp_path.iterdir()] == ["rep"]  # the temporary folder was renamed, not left


def test_rotations_ppl_axis_is_logarithmic():
    """RTN W4A4 (~10^4) next to FP32 (~20): the perplexity axis is logarithmic, W4A16 alone's is not."""
    from llmc import report_plots

    assert report_plots._log_if_wide([r.ppl for r in load_source(BENCHMARKS[1]).rows if r.ppl is not None])
    assert not report_plots._log_if_wide([r.ppl for r in load_source(BENCHMARKS[0]).rows if r.setting == "W4A16 g128"])


def test_report_from_run_folder(tiny_llama_dir, tmp_path):
    """A tiny GPTQ run saved with results.json: its per-block record and a report with every plot;
    a second, hand-written run with task results adds the accuracy plot."""
    weight = {"bit": 3, "granularity": "per_group", "group_size": 32}
    run = tmp_path / "run"
    llmc.compress(tiny_config(tiny_llama_dir, quant={"method": "GPTQ", "weight": weight},
                              save={"save_path": str(run)}), progress=False)
    saved = json.loads((run / "results.json").read_text())
    blocks = saved["blocks"]
    assert [b["block"] for b in blocks] == [0, 1, 2]
    assert all(0 < b["output_rel_error"] < 1 and b["seconds"] > 0 and b["peak_gib"] is None for b in blocks)

    tasks = dict(saved, downstream={
        "pretrain": {"piqa": {"acc,none": 0.70, "acc_stderr,none": 0.01}, "lambada_openai": {"acc": 0.4, "stderr": 0.02}},
        "fake_quant": {"piqa": {"acc,none": 0.61, "acc_stderr,none": 0.01}, "lambada_openai": {"acc": 0.2, "stderr": 0.02}},
    })
    (tmp_path / "with_tasks.json").write_text(json.dumps(tasks))
    assert main(["report", str(run)]) == 0
    report = run / "report" / "report.md"  # the default --out of one run folder
    assert {p.name for p in linked_plots(report)} == {"ppl_runs.png", "block_error.png", "block_time.png"}

    report = write_report([run, tmp_path / "with_tasks.json"], tmp_path / "both")
    assert {p.name for p in linked_plots(report)} == {"ppl_runs.png", "block_error.png", "block_time.png",
                                                      "tasks.png"}
    text = report.read_text()
    assert "0.6100 ± 0.0100 (acc)" in text and "0.2000 ± 0.0200 (acc)" in text
    assert write_report([run], tmp_path / "both") == report  # an existing report is replaced
    assert not (report.parent / "plots" / "tasks.png").exists()

    # llmc's own `downstream` entry (llmc.eval.downstream.downstream_dict): rows of task, position, metric
    rows = [{"task": "lambada_openai", "position": p, "metric": m, "value": v, "stderr": e}
            for p, m, v, e in [("pretrain", "perplexity", 30.0, 2.0), ("pretrain", "acc", 0.45, 0.03),
                               ("fake_quant", "perplexity", 90.0, 5.0), ("fake_quant", "acc", 0.25, 0.02)]]
    (tmp_path / "llmc_rows.json").write_text(json.dumps(dict(saved, downstream={"harness": "x", "results": rows})))
    report = write_report([tmp_path / "llmc_rows.json"], tmp_path / "rows")
    assert "tasks.png" in {p.name for p in linked_plots(report)}
    text = report.read_text()
    assert "| FP | 0.4500 ± 0.0300 (acc) |" in text and "| GPTQ | 0.2500 ± 0.0200 (acc) |" in text


@torch.no_grad()
@pytest.mark.parametrize("quant_out", [False, True])
def test_block_records(tiny_llama_dir, quant_out):
    """The recorded output error is 0 for an untouched block, ||ΔW x||-sized for a perturbed one, and the
    same for block 0 whichever block feeds the next (its inputs are the same either way)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    adapter = get_adapter("auto", model.config.model_type)
    ids = torch.randint(3, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    inputs = capture_block_inputs(model, adapter, [{"input_ids": ids[:2]}, {"input_ids": ids[2:]}], CPU)

    def block0() -> torch.Tensor:
        hidden, args, kwargs = inputs.for_block(0).batch(0, CPU)
        out = adapter.get_blocks(model)[0](hidden, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    reference = block0()
    torch.manual_seed(1)
    noise = torch.randn_like(adapter.get_blocks(model)[0].mlp.down_proj.weight) * 0.05

    def process(ctx):
        if ctx.index == 0:
            ctx.block.mlp.down_proj.weight += noise

    pipe = BlockwisePipeline(model, adapter, CPU, quant_out=quant_out, progress=False, record_blocks=True)
    pipe.run(inputs, process)
    records = pipe.block_records
    assert [r["block"] for r in records] == [0, 1, 2] and [r["output_rel_error"] for r in records[1:]] == [0.0, 0.0]
    perturbed = block0()
    expected = float((perturbed - reference).norm() / reference.norm())
    assert expected > 1e-3
    assert records[0]["output_rel_error"] == pytest.approx(expected, rel=1e-4)
    assert BlockwisePipeline(model, adapter, CPU, progress=False).block_records == []  # off by default


@pytest.mark.parametrize("case", ["missing", "no_results", "malformed", "not_llmc", "array"])
def test_bad_input_is_one_line(tmp_path, capsys, case):
    target = tmp_path / case
    if case == "no_results":
        target.mkdir()
    elif case == "malformed":
        target.write_text('{"perplexity": [')
    elif case == "not_llmc":
        target.write_text('{"rows": [{"x": 1}]}')
    elif case == "array":
        target.write_text("[1, 2]")
    out = tmp_path / "out"
    assert main(["report", str(RESULTS / "accuracy_smollm2.json"), str(target), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmc: error: ") and err.count("\n") == 1 and str(target) in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ([case] if case != "missing" else [])


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    from llmc import report_plots

    def broken(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report_plots, "draw_all", broken)
    with pytest.raises(ReportError, match="No space left on device"):
        write_report(BENCHMARKS[:1], tmp_path / "rep")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ReportError, match="not an llmc report folder"):
        write_report(BENCHMARKS[:1], tmp_path / "mine")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
