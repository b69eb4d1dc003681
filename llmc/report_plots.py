"""The PNG plots of `llmc report` (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from llmc.report import BlockSeries, Row, Source  # noqa: E402

LOG_RATIO = 20.0
"""Above this max/min ratio a value axis is logarithmic (RTN W4A4 perplexities reach 10^4)."""
DPI = 110


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "source"


def _log_if_wide(values: list[float]) -> bool:
    positive = [v for v in values if v > 0]
    return len(positive) == len(values) and bool(positive) and max(positive) / min(positive) > LOG_RATIO


def _save(fig, folder: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(folder / name, dpi=DPI)
    plt.close(fig)
    return name


def _colors(keys: list[str]) -> dict[str, object]:
    cmap = plt.get_cmap("tab20")
    return {k: cmap(i % 20) for i, k in enumerate(dict.fromkeys(keys))}


def plot_ppl(rows: list[Row], title: str, folder: Path, name: str) -> str:
    """One horizontal bar per (setting, method), coloured by method, in input order."""
    rows = [r for r in rows if r.ppl is not None]
    colors = _colors([r.method for r in rows])
    several = len({r.source for r in rows}) > 1
    fig, ax = plt.subplots(figsize=(8, 1.6 + 0.28 * len(rows)))
    y = list(range(len(rows)))[::-1]
    ax.barh(y, [r.ppl for r in rows], color=[colors[r.method] for r in rows])
    ax.set_yticks(y, [f"{r.source}: {r.label}" if several else r.label for r in rows], fontsize=7)
    if _log_if_wide([r.ppl for r in rows]):
        ax.set_xscale("log")
    for yi, r in zip(y, rows):
        ax.text(r.ppl, yi, f" {r.ppl:.2f}", va="center", fontsize=6)
    ax.set_xlabel("perplexity (lower is better)")
    ax.set_title(title, fontsize=9)
    return _save(fig, folder, name)


def plot_tasks(rows: list[Row], folder: Path) -> str:
    """Grouped horizontal bars: one group per task, one bar (with stderr) per model."""
    tasks = sorted({t for r in rows for t in r.tasks})
    colors = _colors([f"{r.source}: {r.label}" for r in rows])
    height = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.22 * len(tasks) * len(rows)))
    for i, r in enumerate(rows):
        ys = [len(tasks) - 1 - t + 0.4 - (i + 0.5) * height for t in range(len(tasks))]
        vals = [r.tasks[t][1] if t in r.tasks else 0.0 for t in tasks]
        errs = [(r.tasks[t][2] or 0.0) if t in r.tasks else 0.0 for t in tasks]
        key = f"{r.source}: {r.label}"
        ax.barh(ys, vals, height=height, xerr=errs, color=colors[key], label=key, capsize=2)
    ax.set_yticks(range(len(tasks))[::-1], [f"{t}\n({next(r.tasks[t][0] for r in rows if t in r.tasks)})"
                                            for t in tasks], fontsize=7)
    ax.set_xlabel("score (higher is better for acc; ± stderr)")
    ax.legend(fontsize=6, loc="best")
    ax.set_title("downstream tasks", fontsize=9)
    return _save(fig, folder, "tasks.png")


def plot_blocks(series: list[BlockSeries], values, ylabel: str, title: str, folder: Path, name: str) -> str:
    fig, ax = plt.subplots(figsize=(8, 4))
    flat = []
    for s in series:
        ys = values(s)
        points = [(i, v) for i, v in enumerate(ys) if v is not None]
        flat += [v for _, v in points]
        ax.plot([i for i, _ in points], [v for _, v in points], marker="o", markersize=3, label=s.label)
    if _log_if_wide(flat):
        ax.set_yscale("log")
    ax.set_xlabel("block")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, loc="best")
    ax.grid(alpha=0.3)
    return _save(fig, folder, name)


def plot_speed(sources: list[Source], folder: Path) -> str:
    rows = [r for s in sources for r in s.speed]
    labels = [f"{r.source}\n{r.run}" for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 0.8 + 0.35 * len(rows)), sharey=True)
    y = list(range(len(rows)))[::-1]
    left.barh(y, [r.seconds or 0.0 for r in rows], color="tab:blue")
    left.set_yticks(y, labels, fontsize=6)
    left.set_xlabel("total seconds")
    right.barh(y, [r.peak_gib or 0.0 for r in rows], color="tab:orange", label="measured peak")
    planned = [(r.planned_gib, yi) for r, yi in zip(rows, y) if r.planned_gib is not None]
    if planned:
        right.scatter(*zip(*planned), color="black", marker="|", s=80, label="planned")
    right.set_xlabel("peak device memory (GiB)")
    right.legend(fontsize=6)
    fig.suptitle("speed benchmark: time and peak memory", fontsize=9)
    return _save(fig, folder, "speed.png")


def draw_all(sources: list[Source], folder: Path) -> dict[str, str]:
    """Draw every plot the sources have data for into `folder`; returns {key: file name}."""
    plots: dict[str, str] = {}
    runs = [r for s in sources if s.kind == "run" for r in s.rows]
    if any(r.ppl is not None for r in runs):
        plots["ppl_runs"] = plot_ppl(runs, "perplexity of the runs", folder, "ppl_runs.png")
    for s in sources:
        if s.kind == "accuracy" and any(r.ppl is not None for r in s.rows):
            plots[f"ppl_{s.name}"] = plot_ppl(s.rows, f"perplexity: {s.name}", folder, f"ppl_{_safe(s.name)}.png")
    task_rows = [r for s in sources for r in s.rows if r.tasks]
    if task_rows:
        plots["tasks"] = plot_tasks(task_rows, folder)
    series = [b for s in sources for b in s.blocks]
    with_error = [b for b in series if any(e is not None for e in b.error)]
    if with_error:
        plots["block_error"] = plot_blocks(with_error, lambda b: b.error, "relative output error",
                                           "block output error vs the float block (calibration batch 0)",
                                           folder, "block_error.png")
    if any(b.seconds for b in series):
        plots["block_time"] = plot_blocks([b for b in series if b.seconds], lambda b: b.seconds, "seconds",
                                          "wall time per block", folder, "block_time.png")
    with_peak = [b for b in series if any(p is not None for p in b.peak_gib)]
    if with_peak:
        plots["block_memory"] = plot_blocks(with_peak, lambda b: b.peak_gib, "GiB",
                                            "peak device memory so far, after each block", folder,
                                            "block_memory.png")
    if any(s.speed for s in sources):
        plots["speed"] = plot_speed(sources, folder)
    return plots
