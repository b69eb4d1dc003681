"""llm-compressor's data-parallel oneshot on the random-weight model of benchmarks/scale.py (GPU, torchrun):

    python -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/peer_scale.py --model DIR \
        --bench-run gptq --out row.json

As llm-compressor 0.14's guide "Distributed Oneshot" (docs/guides/big_models_and_distributed/
distributed_oneshot.md; compressed_tensors 0.19 `offload.init_dist`, `offload.load_offloaded_model`)
says: `init_dist()` (NCCL, cuda:LOCAL_RANK), the model loaded inside `load_offloaded_model()` with
`device_map="auto_offload"` (rank 0 reads the weights, the others share them), and each rank given its
contiguous share of the 128 calibration sequences (the guide's `get_rank_partition`). GPTQ then
solves each linear on one rank (greedy bin packing, llmcompressor/modifiers/gptq/base.py) and
broadcasts it. Guide: https://docs.vllm.ai/projects/llm-compressor/en/latest/guides/big_models_and_distributed/distributed_oneshot/
Wall time of `oneshot` (load excluded; ranks start after a barrier, end when the slowest is done),
peak GPU memory and host VmHWM per rank; rank 0 writes the row.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_speed import recipe  # noqa: E402


def host_peak_gib() -> float:
    """VmHWM, GiB (as scale_driver's; not imported from there, which would import llmc into the peer's process)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--bench-run", dest="run", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--n-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--offload-dir", default="/tmp/llmc-scale-work/peer_offload")
    args = parser.parse_args()

    import llmcompressor
    import torch.distributed as dist
    from compressed_tensors.offload import init_dist, load_offloaded_model
    from datasets import Dataset
    from llmcompressor import oneshot
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    init_dist()
    if dist.get_rank() == 0:  # what a previous run offloaded there is not this run's
        shutil.rmtree(args.offload_dir, ignore_errors=True)
    dist.barrier()
    start = time.perf_counter()
    with load_offloaded_model():  # offload_folder: where what exceeds its CPU budget (/dev/shm's size) goes
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, device_map="auto_offload",
                                                     offload_folder=args.offload_dir)
    load_s = time.perf_counter() - start
    offloaded = sum(len(files) for _, _, files in os.walk(args.offload_dir))  # tensors that went to disk
    ids = torch.randint(0, model.config.vocab_size, (args.n_samples, args.seq_len),
                        generator=torch.Generator().manual_seed(0))
    # Each rank its own contiguous share, as the guide's step 3 does (get_rank_partition): oneshot's own split
    # of identical datasets relies on equal dataset fingerprints across ranks, which a transform can break.
    rank, world = dist.get_rank(), dist.get_world_size()
    share = ids[args.n_samples * rank // world : args.n_samples * (rank + 1) // world]
    data = Dataset.from_dict({"input_ids": share.tolist(), "attention_mask": torch.ones_like(share).tolist()})
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")))
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, dataset=data, recipe=recipe(args.run),
            num_calibration_samples=len(share), max_seq_length=args.seq_len, shuffle_calibration_samples=False)
    torch.cuda.synchronize()
    mine = time.perf_counter() - start
    dist.barrier()
    seconds = time.perf_counter() - start
    stats = {"seconds": mine, "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "rss_gib": host_peak_gib(),
             "load_s": load_s, "samples": len(share)}
    ranks = [None] * world
    dist.all_gather_object(ranks, stats)
    if rank == 0:
        row = {"tool": "llm-compressor", "run": args.run, "gpus": world, "seconds": seconds,
               "load_s": max(r["load_s"] for r in ranks), "peak_gib": max(r["peak_gib"] for r in ranks),
               "rss_gib": max(r["rss_gib"] for r in ranks), "ranks": ranks, "version": llmcompressor.__version__,
               "disk_offloaded_files": offloaded, "shm_gib": shutil.disk_usage("/dev/shm").total / 2**30}
        Path(args.out).write_text(json.dumps(row) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
