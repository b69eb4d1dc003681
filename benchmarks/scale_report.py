"""Rows of benchmarks/scale.py judged and rendered: agreement of 1- and N-GPU weights, host RSS fitted in the
layer count, time extrapolated to the full depth, and the markdown table (written beside the JSON)."""

from __future__ import annotations

import json
import os
from pathlib import Path

TARGETS = [
    "Issue 17 targets: data-parallel calibration on N GPUs gives the 1-GPU result up to float summation order "
    "(agreement: fraction of probe weights on another grid point, and their max difference), and shortens the "
    "run (llm-compressor: Llama-3-8B GPTQ 745 s on 1 GPU, 264 s on 4).",
    "Disk-streamed models: host memory stays near one or two blocks plus the activation cache whatever the "
    "model size, so streamed RSS is flat in the layer count while in-memory RSS grows ~1.6 GiB per 70B layer.",
    "One GPU (part 3, not measured here): GPTQ W4 g128 <= 20 s and AWQ <= 40 s on the 7B shape.",
]


def fmt(n: float | None, digits: int = 2) -> str:
    return "" if n is None or n != n else f"{n:.{digits}f}"


def mean_block(row: dict) -> float | None:
    blocks = row.get("per_block_s") or []
    steady = blocks[1:] if len(blocks) > 1 else blocks  # the first block pays warm-up (and a cold read)
    return sum(steady) / len(steady) if steady else None


def extrapolated_s(row: dict, layers: int) -> float | None:
    per = mean_block(row)
    if per is None:
        return None
    return row["seconds"] - sum(row["per_block_s"]) + per * layers


def rss_fit(rows: list[dict], stream: bool, full: int) -> tuple[float, float] | None:
    """(GiB per layer, GiB at `full` layers) of host peak RSS over the host rows of one mode."""
    pts = sorted({r["layers"]: r["rss_gib"] for r in rows if r.get("kind") in ("host", "disk")
                  and r.get("stream") == stream and "rss_gib" in r and r.get("gpus", 1) == 1}.items())
    if len(pts) < 2:
        return None
    n = len(pts)
    mx, my = sum(p[0] for p in pts) / n, sum(p[1] for p in pts) / n
    slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    return slope, my + slope * (full - mx)


def agreement(ref: Path, other: Path) -> dict:
    import torch

    a, b = ({k: v.float() for k, v in torch.load(p).items()} for p in (ref, other))
    names = sorted(set(a) & set(b))
    if not names:
        return {"error": "no probe weights in common"}
    diff = [(a[n] - b[n]).abs() for n in names]
    return {"probes": len(names), "max_abs": max(float(d.max()) for d in diff),
            "frac_differ": sum(int((d > 0).sum()) for d in diff) / sum(d.numel() for d in diff),
            "weight_absmax": max(float(a[n].abs().max()) for n in names)}


def note(row: dict, data: dict) -> str:
    if "error" in row:
        return row["error"]
    if "skipped" in row:
        return row["skipped"]
    parts = []
    one = next((r for r in data["rows"] if r.get("tool") == row["tool"] and r.get("shape") == row["shape"]
                and r.get("run") == row["run"] and r.get("gpus") == 1 and r.get("kind") in ("dp", "peer")
                and "seconds" in r), None)
    if row.get("gpus", 1) > 1 and one is not None:
        parts.append(f"{one['seconds'] / row['seconds']:.2f}x the 1-GPU speed")
    if row["tool"] != "llmc":
        ours = next((r for r in data["rows"] if r.get("tool") == "llmc" and r.get("shape") == row["shape"]
                     and r.get("run") == row["run"] and r.get("gpus") == row["gpus"] and "seconds" in r), None)
        if ours:
            parts.append(f"llmc {row['seconds'] / ours['seconds']:.1f}x faster on {row['gpus']} GPU(s)")
    if "agreement" in row:
        ag = row["agreement"]
        parts.append(ag["error"] if "error" in ag else
                     f"vs 1 GPU: {100 * ag['frac_differ']:.3f}% of probe weights differ, max {ag['max_abs']:.2e} "
                     f"(weights up to {ag['weight_absmax']:.2e})")
    full = row.get("full_layers")
    if full and row.get("layers") != full and extrapolated_s(row, full) is not None:
        parts.append(f"{full} layers: {extrapolated_s(row, full):.0f} s")
    if row.get("disk_offloaded_files"):  # llm-compressor's auto_offload: CPU budget = /dev/shm size - 5 GB
        parts.append(f"{row['disk_offloaded_files']} tensors offloaded to disk (/dev/shm {row['shm_gib']:.0f} GiB)")
    if "build" in row:
        parts.append(f"model built in {row['build']['build_s']:.0f} s ({row['build']['build_gib']:.1f} GiB written)")
    if row.get("cache_dropped"):
        parts.append("page cache dropped before the run")
    return "; ".join(parts)


def order(row: dict) -> tuple:
    """Table order: kinds as run, then shape, run, layers, GPUs, in memory before streamed."""
    return (["dp", "peer", "host", "disk"].index(row.get("kind", "dp")), row.get("shape", ""), row.get("run", ""),
            row.get("layers") or 0, row.get("gpus") or 0, bool(row.get("stream")))


def render(out: Path, data: dict) -> None:
    env = data["environment"]
    lines = [f"# Scale: data-parallel calibration and host memory ({data['tag']})", "",
             f"- device: {env['device']}; torch {env['torch']}, transformers {env['transformers']}"
             + (f"; llmc at {env['commit']}" if env.get("commit") else ""),
             f"- calibration: {data['n_samples']} x {data['seq_len']} random tokens, batch {data['bs']}, bf16 "
             "random-weight Llama shapes; time = input capture + all blocks (model load excluded); GPU peak = "
             "max over ranks of torch.cuda.max_memory_allocated; host RSS = max over ranks of VmHWM (load included)",
             *[f"- command: `{c}`" for c in data["commands"]], "",
             "| row | tool | GPUs | layers | time (s) | s/block | GPU peak (GiB) | host RSS (GiB) | load (s) | note |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in sorted(data["rows"], key=order):
        per = mean_block(r)
        lines.append(f"| {r['key']} | {r.get('tool', '')} | {r.get('gpus', '')} | {r.get('layers', '')} | "
                     f"{fmt(r.get('seconds'), 1)} | {fmt(per)} | {fmt(r.get('peak_gib'))} | {fmt(r.get('rss_gib'))} | "
                     f"{fmt(r.get('load_s'), 1)} | "
                     f"{note(r, data)} |")
    fits = [(mode, rss_fit(data["rows"], mode == "streamed", 80)) for mode in ("in memory", "streamed")]
    fits = [(m, f) for m, f in fits if f is not None]
    if fits:
        lines += ["", "Host peak RSS fitted linearly in the layer count over the host and disk rows, at 80 layers:", ""]
        lines += [f"- {m}: {s:+.3f} GiB per layer, {at:.1f} GiB at 80 layers" for m, (s, at) in fits]
    for r in (r for r in data["rows"] if r.get("kind") == "disk" and "seconds" in r):
        full = r["full_layers"]
        on = f" on {r['gpus']} GPUs (data-parallel, per rank)" if r.get("gpus", 1) > 1 else ""
        lines += ["", f"Disk-streamed {r['shape']} with {r['layers']} layers{on}, extrapolated to {full}: "
                  f"{extrapolated_s(r, full):.0f} s (capture {r['seconds'] - sum(r['per_block_s']):.1f} s + {full} x "
                  f"{mean_block(r):.2f} s per block after the first); GPU peak {r['peak_gib']:.2f} GiB does not grow "
                  f"with layers (one block on the GPU); host RSS {r['rss_gib']:.2f} GiB (planner: "
                  f"{r['planned_host_gib']:.2f} GiB)."]
    lines += ["", "What the rows aim at:", "", *[f"- {t}" for t in TARGETS]]
    if data.get("notes"):
        lines += ["", *[f"- {n}" for n in data["notes"]]]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def save(out: Path, data: dict) -> None:
    tmp = out.with_name(out.name + ".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, out.with_suffix(".json"))
    render(out, data)
