"""`llmc report RUN_DIR [RUN_DIR...] [--out DIR]`: one markdown report with PNG plots.

Inputs: run folders (or their results.json, written by `llmc.runner`) and the benchmark JSONs of
benchmarks/results/ (accuracy_*.json: rows of setting, method, ppl; speed_*.json: rows of run,
seconds, peak_gib, per_block_s). The report (report.md and plots/*.png) is written to a temporary
folder next to `--out` and renamed into place, so a failed report leaves nothing half-written.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from llmc.errors import LlmcError

REPORT_NAME = "report.md"
TASK_KEYS = ("downstream", "tasks", "lm_eval")
"""Keys a results.json may hold task results under (see `_positional_tasks` for the shapes)."""
PREFERRED_METRICS = ("acc", "acc_norm", "exact_match", "f1", "mcc", "word_perplexity")


class ReportError(LlmcError):
    """A report input is missing or unreadable, or the report folder cannot be written."""


@dataclass
class Row:
    """One compressed (or float) model's numbers: a bar in the plots, a line in the tables."""

    source: str
    setting: str
    method: str
    ppl: float | None = None
    quantize_s: float | None = None
    peer_ppl: float | None = None
    tasks: dict[str, tuple[str, float, float | None]] = field(default_factory=dict)
    """task -> (metric, value, stderr)."""

    @property
    def label(self) -> str:
        return f"{self.setting} · {self.method}" if self.setting != self.method else self.method


@dataclass
class BlockSeries:
    """Per-block numbers of one run: seconds, relative output error, peak memory (GiB)."""

    label: str
    seconds: list[float] = field(default_factory=list)
    error: list[float | None] = field(default_factory=list)
    peak_gib: list[float | None] = field(default_factory=list)


@dataclass
class SpeedRow:
    source: str
    run: str
    seconds: float | None
    peak_gib: float | None
    planned_gib: float | None
    blocks: int


@dataclass
class Source:
    name: str
    kind: str  # run, accuracy, speed
    description: str
    rows: list[Row] = field(default_factory=list)
    blocks: list[BlockSeries] = field(default_factory=list)
    speed: list[SpeedRow] = field(default_factory=list)


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ReportError(f"cannot read {path} ({exc.strerror}); check the path and its permissions") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path} is not valid JSON ({exc}); re-run what wrote it or pass another file") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path} holds a JSON {type(data).__name__}, not an object; pass an llmc results.json "
                          f"or a benchmark JSON")
    return data


def resolve_input(arg: str | Path) -> Path:
    """The JSON file an argument names: a file itself, or a run folder's results.json."""
    path = Path(arg).expanduser()
    if not path.exists():
        raise ReportError(f"{path} does not exist; pass a run folder (with results.json) or a results JSON")
    if path.is_dir():
        path = path / "results.json"
        if not path.is_file():
            raise ReportError(f"{path.parent} has no results.json (an unfinished or non-llmc folder); pass the "
                              f"save_path of a finished `llmc run`")
    return path


def load_source(arg: str | Path) -> Source:
    path = resolve_input(arg)
    data = read_json(path)
    name = path.parent.name if path.name == "results.json" else path.stem
    if "perplexity" in data and "config" in data:
        return run_source(name, data)
    rows = data.get("rows")
    if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
        if any("per_block_s" in r or "peak_gib" in r for r in rows):
            return speed_source(name, data)
        if any("ppl" in r for r in rows):
            return accuracy_source(name, data)
    raise ReportError(f"{path} is neither an llmc results.json (perplexity, config) nor a benchmark JSON "
                      f"(rows with ppl or per_block_s); pass one of those")


def describe_setting(quant: dict | None) -> str:
    """'W4A16 g128' style label of a config's quant section ('FP' without one)."""
    if not quant:
        return "FP"
    weight, act = quant.get("weight") or {}, quant.get("act") or {}
    bits = f"W{weight.get('bit', '?')}A{act.get('bit', 16) if act else 16}"
    if weight.get("granularity") == "per_group" and weight.get("group_size"):
        bits += f" g{weight['group_size']}"
    return bits


def method_name(quant: dict | None) -> str:
    method = (quant or {}).get("method")
    if isinstance(method, list):
        return "+".join(str(m) for m in method)
    return str(method) if method else "FP"


def task_results(data: object) -> dict[str, tuple[str, float, float | None]]:
    """{task: (metric, value, stderr)} from {task: {metric: value, stderr: x}} (lm-eval's 'acc,none' too)."""
    out: dict[str, tuple[str, float, float | None]] = {}
    if not isinstance(data, dict):
        return out
    for task, metrics in data.items():
        if not isinstance(metrics, dict):
            continue
        values = {str(k).split(",")[0]: _number(v) for k, v in metrics.items()}
        candidates = [k for k, v in values.items() if v is not None and "stderr" not in k]
        if not candidates:
            continue
        metric = next((m for m in PREFERRED_METRICS if m in candidates), candidates[0])
        stderr = values.get(f"{metric}_stderr", values.get("stderr"))
        out[str(task)] = (metric, values[metric], stderr)
    return out


def _positional_tasks(data: dict) -> dict[str, dict]:
    """{eval_pos: {task: metrics}} from a results.json's task key: llmc's `downstream` entry (a `results`
    list of {task, position, metric, value, stderr}), or {task: metrics} per eval_pos or not."""
    for key in TASK_KEYS:
        value = data.get(key)
        if not isinstance(value, dict) or not value:
            continue
        if isinstance(value.get("results"), list):
            out: dict[str, dict] = {}
            for r in value["results"]:
                if isinstance(r, dict) and {"task", "metric", "value"} <= r.keys():
                    metrics = out.setdefault(str(r.get("position", "fake_quant")), {}).setdefault(str(r["task"]), {})
                    metrics[str(r["metric"])] = r["value"]
                    metrics[f"{r['metric']}_stderr"] = r.get("stderr")
            return out
        if all(isinstance(v, dict) and task_results(v) for v in value.values()):
            return value  # per eval_pos
        return {"fake_quant": value}
    return {}


def run_source(name: str, data: dict) -> Source:
    config = data.get("config") or {}
    quant = config.get("quant")
    method, setting = method_name(quant), describe_setting(quant)
    env = data.get("environment") or {}
    src = Source(name, "run", f"llmc run `{name}` ({setting} {method}; {env.get('device', '?')}, "
                              f"torch {env.get('torch', '?')}, llmc {data.get('llmc_version', '?')})")
    ppl = {p.get("position"): _number(p.get("ppl")) for p in data.get("perplexity") or [] if isinstance(p, dict)}
    tasks = _positional_tasks(data)
    quantize_s = _number((data.get("timings_s") or {}).get("quantize_s"))
    labels = {"pretrain": ("FP", "FP"), "transformed": (setting, f"{method} (transformed)"),
              "fake_quant": (setting, method)}
    for position, (row_setting, row_method) in labels.items():
        if position not in ppl and position not in tasks:
            continue
        src.rows.append(Row(name, row_setting, row_method, ppl.get(position),
                            quantize_s if position == "fake_quant" else None,
                            tasks=task_results(tasks.get(position))))
    blocks = [b for b in data.get("blocks") or [] if isinstance(b, dict)]
    if blocks:
        src.blocks.append(BlockSeries(
            f"{name}: {setting} {method}",
            seconds=[_number(b.get("seconds")) or 0.0 for b in blocks],
            error=[_number(b.get("output_rel_error")) for b in blocks],
            peak_gib=[_number(b.get("peak_gib")) for b in blocks],
        ))
    return src


def accuracy_source(name: str, data: dict) -> Source:
    env = data.get("environment") or {}
    src = Source(name, "accuracy", f"benchmark `{name}`: {data.get('model', '?')}; {data.get('evaluation', '')} "
                                   f"({env.get('device', '?')})")
    for r in data["rows"]:
        peer = r.get("peer") if isinstance(r.get("peer"), dict) else {}
        src.rows.append(Row(name, str(r.get("setting", "?")), str(r.get("method", "?")), _number(r.get("ppl")),
                            _number(r.get("quantize_s")), _number(peer.get("ppl")),
                            tasks=task_results(r.get("tasks"))))
    return src


def speed_source(name: str, data: dict) -> Source:
    env = data.get("environment") or {}
    src = Source(name, "speed", f"benchmark `{name}`: {data.get('shape', '?')} shape, {data.get('layers', '?')} "
                                f"layers, {data.get('n_samples', '?')} x {data.get('seq_len', '?')} tokens "
                                f"({env.get('device', '?')})")
    for r in data["rows"]:
        per_block = [_number(s) or 0.0 for s in r.get("per_block_s") or []]
        run = f"{r.get('tool', 'llmc')}: {r.get('run', '?')}"
        src.speed.append(SpeedRow(name, run, _number(r.get("seconds")), _number(r.get("peak_gib")),
                                  _number(r.get("planned_gib")), len(per_block)))
        if per_block:
            src.blocks.append(BlockSeries(f"{name}: {run}", seconds=per_block))
    return src


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def render_markdown(sources: list[Source], plots: dict[str, str]) -> str:
    lines = ["# llmc report", "", "Inputs:", ""]
    lines += [f"- {s.description}" for s in sources]

    def image(key: str, title: str) -> None:
        if key in plots:
            lines.extend(["", f"![{title}]({plots[key]})"])

    rows = [r for s in sources for r in s.rows]
    if any(r.ppl is not None for r in rows):
        lines += ["", "## Perplexity", "", "| source | setting | method | ppl | quantize (s) | peer ppl |",
                  "|---|---|---|---:|---:|---:|"]
        lines += [f"| {r.source} | {r.setting} | {r.method} | {_fmt(r.ppl, 3)} | {_fmt(r.quantize_s, 1)} | "
                  f"{_fmt(r.peer_ppl, 3)} |" for r in rows if r.ppl is not None]
        for key in sorted(k for k in plots if k.startswith("ppl")):
            image(key, f"perplexity ({key.removeprefix('ppl_')})")
    task_rows = [r for r in rows if r.tasks]
    if task_rows:
        tasks = sorted({t for r in task_rows for t in r.tasks})
        lines += ["", "## Task accuracy", "", "| source | setting | method | " + " | ".join(tasks) + " |",
                  "|---|---|---|" + "---:|" * len(tasks)]
        for r in task_rows:
            cells = [f"{r.tasks[t][1]:.4f} ± {_fmt(r.tasks[t][2], 4)} ({r.tasks[t][0]})" if t in r.tasks else "–"
                     for t in tasks]
            lines.append(f"| {r.source} | {r.setting} | {r.method} | " + " | ".join(cells) + " |")
        image("tasks", "task accuracy")
    series = [b for s in sources for b in s.blocks]
    if series:
        lines += ["", "## Per block", "", "| run | blocks | total (s) | slowest block (s) | mean output error | "
                  "max output error | peak memory (GiB) |", "|---|---:|---:|---:|---:|---:|---:|"]
        for b in series:
            errors = [e for e in b.error if e is not None]
            peaks = [p for p in b.peak_gib if p is not None]
            lines.append(f"| {b.label} | {len(b.seconds)} | {_fmt(sum(b.seconds), 1)} | {_fmt(max(b.seconds))} | "
                         f"{_fmt(sum(errors) / len(errors) if errors else None, 4)} | "
                         f"{_fmt(max(errors) if errors else None, 4)} | {_fmt(max(peaks) if peaks else None)} |")
        lines += ["", "Output error: ||processed block − float block|| / ||float block|| on calibration batch 0, "
                      "each block fed the inputs the run used. Peak memory: the device's peak so far (CUDA only)."]
        image("block_error", "per-block output error")
        image("block_time", "time per block")
        image("block_memory", "peak memory per block")
    speed = [r for s in sources for r in s.speed]
    if speed:
        lines += ["", "## Speed and memory", "", "| source | run | blocks | seconds | peak (GiB) | planned (GiB) |",
                  "|---|---|---:|---:|---:|---:|"]
        lines += [f"| {r.source} | {r.run} | {r.blocks} | {_fmt(r.seconds, 1)} | {_fmt(r.peak_gib)} | "
                  f"{_fmt(r.planned_gib)} |" for r in speed]
        image("speed", "total time and peak memory")
    return "\n".join(lines) + "\n"


def default_out(inputs: list[str | Path]) -> Path:
    """`<run folder>/report` for a single run folder, else ./llmc-report."""
    if len(inputs) == 1 and Path(inputs[0]).expanduser().is_dir():
        return Path(inputs[0]).expanduser() / "report"
    return Path("llmc-report")


def write_report(inputs: list[str | Path], out: str | Path | None = None) -> Path:
    """Read every input, draw the plots and write `out/report.md`; returns its path."""
    if not inputs:
        raise ReportError("no inputs; pass run folders, results.json files or benchmark JSONs")
    sources = [load_source(arg) for arg in inputs]  # every input is checked before anything is written
    try:
        from llmc import report_plots
    except ImportError:
        raise ReportError("the report needs matplotlib; install it with pip install 'llmc[report]'") from None
    final = Path(out).expanduser() if out is not None else default_out(inputs)
    if final.exists() and not (final.is_dir() and ((final / REPORT_NAME).is_file() or not any(final.iterdir()))):
        raise ReportError(f"{final} exists and is not an llmc report folder; choose another --out or remove it")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    except OSError as exc:
        raise ReportError(f"cannot create the report folder next to {final} ({exc.strerror}); "
                          f"choose another --out") from None
    try:
        (tmp / "plots").mkdir()
        plots = report_plots.draw_all(sources, tmp / "plots")
        (tmp / REPORT_NAME).write_text(render_markdown(sources, {k: f"plots/{v}" for k, v in plots.items()}),
                                       encoding="utf-8")
        tmp.chmod(0o755)
        old = None
        if final.exists():  # the previous report, set aside until the new one is in place
            old = final.parent / f".{final.name}.old-{tmp.name.rsplit('-', 1)[-1]}"
            final.rename(old)
        tmp.rename(final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ReportError(f"cannot write the report to {final} ({exc.strerror}); choose another --out") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final / REPORT_NAME
