"""Speed and memory on a GPU: random-weight models with real Llama shapes, 128 x 2048 calibration.

    python benchmarks/speed.py --shape llama2-7b --runs rtn,gptq,gptq_actorder,awq,sq,ppl
    python benchmarks/speed.py --shape llama2-70b --layers 2 --runs rtn,gptq,awq     # truncated 70B
    python benchmarks/speed.py --shape llama2-7b --runs gptq --peer gptq             # + llm-compressor
    python benchmarks/speed.py --shape llama2-7b --layers 2 --runs gptq --profile gptq  # op-level profile
    python benchmarks/speed.py --shape llama2-7b --layers 4 --runs gptq --profile gptq --profile-blocks 2:3
        # one steady block only: op table plus a timeline (<out>_trace_gptq.json.gz, perfetto / chrome://tracing)

The model is built once with random weights (bf16) and saved as safetensors under
--model-root; load time is excluded. Each run reports end-to-end wall time (input capture
plus every block; excludes model load and evaluation), peak GPU memory
(torch.cuda.max_memory_allocated), the memory planner's estimate, and per-block time.
Results are appended to <out>.json and rendered to <out>.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment  # noqa: E402

SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000),
    "llama2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=32000),
}
W4G128 = {"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 128}
W8A8 = {"weight": {"bit": 8, "symmetric": True, "granularity": "per_channel", "group_size": -1},
        "act": {"bit": 8, "symmetric": True, "granularity": "per_token"}}
W4A4 = {"weight": {"bit": 4, "symmetric": True, "granularity": "per_channel", "group_size": -1},
        "act": {"bit": 4, "symmetric": True, "granularity": "per_token"}}
QUANT_RUNS = {
    "rtn": {"method": "RTN", "weight": W4G128},
    "gptq": {"method": "GPTQ", "weight": W4G128},
    "gptq_actorder": {"method": "GPTQ", "weight": W4G128, "special": {"actorder": True, "static_groups": True}},
    "gptq_parallel": {"method": "GPTQ", "weight": W4G128, "special": {"true_sequential": False}},
    "awq": {"method": "AWQ", "weight": W4G128},
    "awq_64k": {"method": "AWQ", "weight": W4G128, "special": {"search_tokens": 65536}},
    "sq": {"method": "SmoothQuant", **W8A8},
    "quarot_gptq_w4a4": {"method": ["QuaRot", "GPTQ"], **W4A4},
    "omniquant_w3": {"method": "OmniQuant", "weight": {**W4G128, "bit": 3, "calib_algo": "learnable"}},
    "flatquant_w4a4": {"method": "FlatQuant", **W4A4},
    "gptq_nvfp4": {"method": "GPTQ", "weight": {"quant_type": "nvfp4"}},
    "gptq_mxfp4": {"method": "GPTQ", "weight": {"quant_type": "mxfp4"}},
    "spqr_w3": {"method": "SpQR", "weight": {**W4G128, "bit": 3, "group_size": 16}},
}
RUNS = {name: {"quant": quant} for name, quant in QUANT_RUNS.items()} | {
    "sparsegpt24": {"sparse": {"method": "SparseGPT", "weight": {"sparsity": 0.5, "pattern": "2:4"}}},
    "wanda24": {"sparse": {"method": "Wanda", "weight": {"sparsity": 0.5, "pattern": "2:4"}}},
}
"""Config sections of each run."""


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def build_model(shape: str, layers: int | None, root: Path) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    dims = dict(SHAPES[shape])
    if layers:
        dims["num_hidden_layers"] = layers
    folder = root / f"{shape}-{dims['num_hidden_layers']}l"
    if (folder / "config.json").exists():
        return folder
    config = LlamaConfig(**dims, max_position_embeddings=4096, tie_word_embeddings=False, torch_dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() == 2 else p.fill_(1.0)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def calibration(vocab: int, n: int, seq_len: int, bs: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n, seq_len), generator=gen)
    return [{"input_ids": ids[i:i + bs], "attention_mask": None} for i in range(0, n, bs)]


def load(folder: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    model.requires_grad_(False)
    return model


def llmc_run(folder: Path, name: str, args: argparse.Namespace, base: torch.nn.Module) -> dict:
    import copy

    from llmc.config import load_config
    from llmc.models import get_adapter
    from llmc.pipeline.checkpoint import RunCheckpoint
    from llmc.schedule import build_methods, compress_batches

    model = copy.deepcopy(base)  # a fresh copy per run; loading from disk is not what we time
    adapter = get_adapter("auto", model.config.model_type)
    cfg = load_config({"model": {"path": str(folder)}, **RUNS[name], "base": {"act_cache": args.act_cache}})
    methods = build_methods(cfg)
    # As in `llmc run`: no calibration forward for methods that need no data (RTN weight-only).
    batches = (calibration(model.config.vocab_size, args.n_samples, args.seq_len, args.bs)
               if any(m.uses_calibration for m in methods) else None)
    device = torch.device(args.device)
    reset_peak(device)
    profiler = profiling(name in args.profile.split(","), device, args.profile_blocks)
    start = time.perf_counter()
    checkpoint = RunCheckpoint(Path(args.checkpoint) / name, "speed") if args.checkpoint else None
    with profiler:
        pipeline = compress_batches(cfg, model, adapter, methods, device, batches, progress=False,
                                    checkpoint=checkpoint)
        sync(device)
    seconds = time.perf_counter() - start
    extra = {}
    if checkpoint is not None:  # resume checkpoints after every block: what they cost
        extra = {"checkpoint_s": checkpoint.write_seconds,
                 "checkpoint_gib": sum(p.stat().st_size for p in checkpoint.folder.iterdir()) / 2**30}
        checkpoint.remove()
    if isinstance(profiler, torch.profiler.profile):
        table = profiler.key_averages().table(sort_by="self_cuda_time_total" if device.type == "cuda"
                                              else "self_cpu_time_total", row_limit=40)
        span = f", blocks {args.profile_blocks}" if args.profile_blocks else ""
        Path(f"{args.out}_profile_{name}.txt").write_text(f"{name} (profiled{span}; slower than unprofiled)\n{table}\n")
        if args.profile_blocks:  # a timeline of those blocks only (chrome://tracing, perfetto)
            profiler.export_chrome_trace(f"{args.out}_trace_{name}.json")
            with open(f"{args.out}_trace_{name}.json", "rb") as raw, gzip.open(f"{args.out}_trace_{name}.json.gz", "wb") as gz:
                gz.write(raw.read())
            Path(f"{args.out}_trace_{name}.json").unlink()
    plan = pipeline.plan
    return {"tool": "llmc", "run": name, "seconds": seconds, "peak_gib": peak_gib(device),
            "planned_gib": plan.peak_device / 2**30, "per_block_s": pipeline.block_seconds,
            "stage_s": {**pipeline.stage_seconds, **{k: v for m in methods for k, v in m.stage_seconds.items()}},
            "blocks": len(pipeline.block_seconds), **extra}


def profiling(on: bool, device: torch.device, blocks: str = ""):
    """A torch profiler over the run (ops by self device time), or nothing. `blocks` "A:B": over blocks
    A to B-1 only (started and stopped as the block loop brings block A and block B to the device)."""
    if not on:
        return contextlib.nullcontext()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    if not blocks:
        return torch.profiler.profile(activities=activities)
    return BlockSpanProfiler(activities, *map(int, blocks.split(":")))


def sync_all() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class BlockSpanProfiler(torch.profiler.profile):
    """A profiler active from the arrival of block `first` to the arrival of block `stop` (or the end)."""

    def __init__(self, activities, first: int, stop: int) -> None:
        super().__init__(activities=activities, with_stack=False)
        self.first, self.stop_at, self.active = first, stop, False

    def __enter__(self):
        from llmc.pipeline import offload

        original = offload.BlockTrips.arrive

        def arrive(trips, index):
            if index == self.first and not self.active:
                sync_all()
                self.start()
                self.active = True
            elif index == self.stop_at and self.active:
                sync_all()
                self.stop()
                self.active = False
            return original(trips, index)

        self._restore = lambda: setattr(offload.BlockTrips, "arrive", original)
        offload.BlockTrips.arrive = arrive
        return self

    def __exit__(self, *exc):
        self._restore()
        if self.active:
            sync_all()
            self.stop()
            self.active = False


def ppl_run(folder: Path, args: argparse.Namespace, base: torch.nn.Module) -> dict:
    from llmc.eval.perplexity import evaluate_perplexity
    from llmc.models import get_adapter

    model = base
    windows = torch.randint(0, model.config.vocab_size, (args.ppl_windows, 2048),
                            generator=torch.Generator().manual_seed(1))
    device = torch.device(args.device)
    evaluate_perplexity(model, get_adapter("auto", "llama"), windows[:1], device, progress=False)  # warm-up
    reset_peak(device)
    result = evaluate_perplexity(model, get_adapter("auto", "llama"), windows, device, bs=args.ppl_bs,
                                 progress=False)
    return {"tool": "llmc", "run": "ppl", "seconds": result.seconds, "tokens_per_s": windows.numel() / result.seconds,
            "peak_gib": peak_gib(device)}


def peer_run(folder: Path, name: str, args: argparse.Namespace) -> dict:
    cmd = [args.peer_python, str(Path(__file__).with_name("peer_speed.py")), "--model", str(folder), "--run", name,
           "--n-samples", str(args.n_samples), "--seq-len", str(args.seq_len)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"tool": "llm-compressor", "run": name, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def render(out: Path, data: dict) -> None:
    lines = [f"# Speed and memory: {data['shape']} ({data['layers']} layers), random weights, bf16", "",
             f"- device: {data['environment']['device']}; torch {data['environment']['torch']}, "
             f"transformers {data['environment']['transformers']}"
             + (f"; llmc at {data['environment']['commit']}" if data["environment"].get("commit") else ""),
             f"- calibration: {data['n_samples']} x {data['seq_len']} tokens, batch {data['bs']}; "
             "time = input capture + all blocks (model load and evaluation excluded)",
             f"- command: `{data['command']}`", "",
             "| tool | run | time (s) | s/block | peak GPU (GiB) | planned (GiB) | note |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    ours = {r["run"]: r for r in data["rows"] if r["tool"] == "llmc" and "seconds" in r}
    for r in data["rows"]:
        if "error" in r:
            lines.append(f"| {r['tool']} | {r['run']} | | | | | {r['error']} |")
            continue
        per_block = sum(r.get("per_block_s") or [0]) / max(1, len(r.get("per_block_s") or [])) or ""
        note = f"{r['tokens_per_s']:.0f} tokens/s" if "tokens_per_s" in r else ""
        if data["layers"] != data["full_layers"] and per_block:
            note = f"extrapolated to {data['full_layers']} layers: {per_block * data['full_layers']:.0f} s"
        if "checkpoint_s" in r:
            note = (f"resume checkpoints on: {r['checkpoint_s']:.1f} s of it spent on them, "
                    f"{r['checkpoint_gib']:.1f} GiB on disk at the end")
        if r["tool"] != "llmc" and r["run"] in ours:
            note = f"llmc {r['seconds'] / ours[r['run']]['seconds']:.1f}x faster in this run"
        if "commit" in r:  # rows merged from several device calls say which code they ran
            note = f"{note}; llmc at {r['commit']}" if note else f"llmc at {r['commit']}"
        lines.append(f"| {r['tool']} | {r['run']} | {r['seconds']:.1f} | "
                     f"{per_block if per_block == '' else f'{per_block:.2f}'} | {r['peak_gib']:.2f} | "
                     f"{r.get('planned_gib', float('nan')):.2f} | {note} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama2-7b", choices=list(SHAPES))
    parser.add_argument("--layers", type=int, default=None, help="truncate to this many decoder layers")
    parser.add_argument("--runs", default="rtn,gptq,awq,sq,ppl")
    parser.add_argument("--n-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--bs", type=int, default=4)
    parser.add_argument("--act-cache", default="auto", choices=["auto", "device", "cpu"])
    parser.add_argument("--ppl-windows", type=int, default=16)
    parser.add_argument("--ppl-bs", type=int, default=4)
    parser.add_argument("--peer", default="", help="comma-separated runs to repeat with llm-compressor")
    parser.add_argument("--peer-python", default=sys.executable)
    parser.add_argument("--profile", default="", help="comma-separated llmc runs to profile (op table to <out>_profile_<run>.txt)")
    parser.add_argument("--profile-blocks", default="", help="A:B: profile blocks A to B-1 only, with a trace")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--checkpoint", default="",
                        help="write llmc's resume checkpoints after every block into this folder (their cost)")
    parser.add_argument("--model-root", default="/tmp/llmc-speed-models")
    parser.add_argument("--out", default="benchmarks/results/speed")
    args = parser.parse_args()
    folder = build_model(args.shape, args.layers, Path(args.model_root))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {"shape": args.shape, "layers": args.layers or SHAPES[args.shape]["num_hidden_layers"],
            "full_layers": SHAPES[args.shape]["num_hidden_layers"], "n_samples": args.n_samples,
            "seq_len": args.seq_len, "bs": args.bs, "environment": environment(),
            "command": "python " + " ".join(sys.argv), "rows": []}
    runs = [r for r in args.runs.split(",") if r]
    base = load(folder) if runs else None
    for name in sorted(runs, key=lambda r: r == "ppl"):  # ppl last: it moves the base model
        try:
            row = ppl_run(folder, args, base) if name == "ppl" else llmc_run(folder, name, args, base)
        except Exception as exc:  # keep measuring the other runs; the table says what failed
            row = {"tool": "llmc", "run": name, "error": f"{type(exc).__name__}: {exc}"[:300]}
        if args.device == "cuda":
            torch.cuda.empty_cache()
        data["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "per_block_s"}), flush=True)
        out.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
        render(out, data)
    for name in [r for r in args.peer.split(",") if r]:
        row = peer_run(folder, name, args)
        data["rows"].append(row)
        print(json.dumps(row), flush=True)
        out.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
        render(out, data)


if __name__ == "__main__":
    main()
