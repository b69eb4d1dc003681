"""One llmc row of benchmarks/scale.py, in its own process (so host peak RSS is this row's alone):

    python benchmarks/scale_driver.py --model DIR --bench-run gptq --out row.json [--stream] [--weights w.pt]
    python -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/scale_driver.py ...

Timed as speed.py's llmc_run: input capture plus every block, model load excluded (all ranks start
together after a barrier; the time ends when the slowest rank is done). Each rank measures its peak
GPU memory (torch.cuda.max_memory_allocated) and peak host RSS (VmHWM, whole process life, load
included); rank 0 writes the row. Under torchrun every rank takes its contiguous share of the same
128 calibration sequences (llmc.pipeline.distributed), NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import RUNS, calibration, load, peak_gib, reset_peak, sync  # noqa: E402

PROBES = ("self_attn.q_proj", "mlp.down_proj")
"""Linears whose fake-quantized weights are saved (first and last block) for the 1-vs-N agreement."""


def host_peak_gib() -> float:
    """Peak resident set size of this process so far (VmHWM), GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def load_model(folder: Path, stream: bool):
    from transformers import AutoModelForCausalLM

    from llmc.models import get_adapter

    if not stream:
        model = load(folder)
        return model, get_adapter("auto", model.config.model_type)
    from transformers import AutoConfig

    from llmc.pipeline.streaming import empty_model

    adapter = get_adapter("auto", AutoConfig.from_pretrained(folder).model_type)
    model = empty_model(str(folder), AutoModelForCausalLM, torch.bfloat16, adapter).eval()
    model.requires_grad_(False)
    return model, adapter


def probe_weights(model, adapter) -> dict[str, torch.Tensor]:
    from llmc.quant.fake_linear import FakeQuantLinear

    blocks = adapter.get_blocks(model)
    out = {}
    for index in sorted({0, len(blocks) - 1}):
        for name in PROBES:
            module = blocks[index].get_submodule(name)
            if isinstance(module, FakeQuantLinear) and not module.weight.is_meta:
                with torch.no_grad():
                    out[f"{index}.{name}"] = module.fake_weight().detach().cpu()
    return out


def run(args: argparse.Namespace) -> dict | None:
    from llmc.config import load_config
    from llmc.pipeline import distributed as dist_
    from llmc.schedule import build_methods, compress_batches

    device = torch.device(args.device)
    with dist_.process_group(device) as device:
        world = dist_.world_size()
        start = time.perf_counter()
        model, adapter = load_model(Path(args.model), args.stream)
        load_s = time.perf_counter() - start
        cfg = load_config({"model": {"path": args.model, "stream": args.stream}, **RUNS[args.run],
                           "base": {"act_cache": args.act_cache}})
        methods = build_methods(cfg)
        if world > 1:
            dist_.check_methods(methods, world)
        batches = (calibration(model.config.vocab_size, args.n_samples, args.seq_len, args.bs)
                   if any(m.uses_calibration for m in methods) else None)
        if batches is not None:
            dist_.check_batches(args.n_samples, args.bs, world)
            batches = dist_.shard(batches)
        reset_peak(device)
        dist_.barrier()
        start = time.perf_counter()
        pipeline = compress_batches(cfg, model, adapter, methods, device, batches, progress=False)
        sync(device)
        mine = time.perf_counter() - start
        dist_.barrier()
        seconds = time.perf_counter() - start
        stats = {"seconds": mine, "peak_gib": peak_gib(device), "rss_gib": host_peak_gib(), "load_s": load_s}
        ranks = [stats]
        if world > 1:
            ranks = [None] * world
            torch.distributed.all_gather_object(ranks, stats)
        if not dist_.is_main():
            return None
        plan = pipeline.plan
        row = {"tool": "llmc", "run": args.run, "gpus": world, "stream": args.stream, "seconds": seconds,
               "load_s": max(r["load_s"] for r in ranks), "peak_gib": max(r["peak_gib"] for r in ranks),
               "rss_gib": max(r["rss_gib"] for r in ranks), "ranks": ranks,
               "planned_gib": plan.peak_device / 2**30, "planned_host_gib": plan.peak_host / 2**30,
               "per_block_s": pipeline.block_seconds, "blocks": len(pipeline.block_seconds),
               "layers": model.config.num_hidden_layers}
        if args.weights:
            torch.save(probe_weights(model, adapter), args.weights)
        return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--bench-run", dest="run", required=True, choices=list(RUNS))
    parser.add_argument("--out", required=True, help="the row as JSON (written by rank 0)")
    parser.add_argument("--weights", default="", help="save the probe linears' fake weights here (rank 0)")
    parser.add_argument("--stream", action="store_true", help="model.stream: blocks read from the safetensors")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--n-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--bs", type=int, default=4)
    parser.add_argument("--act-cache", default="auto", choices=["auto", "device", "cpu"])
    args = parser.parse_args()
    try:
        row = run(args)
    except Exception as exc:  # noqa: BLE001 -- the table says what failed
        if os.environ.get("RANK", "0") != "0":  # (the process group is gone: torchrun's rank)
            raise
        row = {"tool": "llmc", "run": args.run, "error": f"{type(exc).__name__}: {exc}"[:300]}
    if row is not None:
        Path(args.out).write_text(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
