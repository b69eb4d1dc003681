"""Where a run's GPU memory peak comes from: the allocations alive at the peak, summed by the line of
llmc (or else of the library) that made them, from torch's CUDA memory history.

    python benchmarks/memory_peak.py --shape llama2-7b --layers 2 --run gptq --act-cache cpu

Writes the table to stdout and to <out>.txt. The run is speed.py's (random-weight model, 128 x 2048 tokens).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import RUNS, SHAPES, build_model, llmc_run, load  # noqa: E402


def where(frames: list[dict]) -> str:
    """The innermost frame in llmc, else in the benchmarks, else the innermost Python frame."""
    for key in ("/llmc/", "/benchmarks/"):
        for f in frames:
            if key in f["filename"]:
                return f"{f['filename'].split(key, 1)[1]}:{f['line']} {f['name']}"
    f = next((f for f in frames if f["filename"].endswith(".py")), None)
    return f"{Path(f['filename']).name}:{f['line']} {f['name']}" if f else "?"


def peak_table(snapshot: dict, top: int) -> tuple[int, list[tuple[str, int]]]:
    live: dict[int, tuple[int, str]] = {}
    total = peak = 0
    at_peak: dict[int, tuple[int, str]] = {}
    for event in snapshot["device_traces"][0]:
        if event["action"] == "alloc":
            live[event["addr"]] = (event["size"], where(event.get("frames", [])))
            total += event["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif event["action"] == "free_completed" and event["addr"] in live:
            total -= live.pop(event["addr"])[0]
    sums = Counter()
    for size, place in at_peak.values():
        sums[place] += size
    return peak, sums.most_common(top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama2-7b", choices=list(SHAPES))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--run", default="gptq", choices=list(RUNS))
    parser.add_argument("--act-cache", default="cpu", choices=["auto", "device", "cpu"])
    parser.add_argument("--n-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--bs", type=int, default=4)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--model-root", default="/tmp/llmc-speed-models")
    parser.add_argument("--out", default="benchmarks/results/memory_peak")
    args = parser.parse_args()
    args.device, args.profile, args.checkpoint = "cuda", "", ""
    folder = build_model(args.shape, args.layers, Path(args.model_root))
    base = load(folder)
    torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
    row = llmc_run(folder, args.run, args, base)
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    peak, rows = peak_table(snapshot, args.top)
    lines = [f"{args.run} on {args.shape} ({args.layers} layers), act_cache {args.act_cache}, batch {args.bs}: "
             f"peak {peak / 2**30:.3f} GiB from the trace, {row['peak_gib']:.3f} GiB max_memory_allocated",
             "| GiB at the peak | allocated at |", "| ---: | --- |"]
    lines += [f"| {size / 2**30:.3f} | `{place}` |" for place, size in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(f"{args.out}.txt").write_text(text)


if __name__ == "__main__":
    main()
