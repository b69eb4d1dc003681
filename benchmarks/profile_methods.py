"""Where a calibrated method spends its time: a few blocks of a random Llama shaped like SmolLM2-135M.

    python benchmarks/profile_methods.py FlatQuant --epochs 1          # per training step: stage times
    python benchmarks/profile_methods.py FlatQuant --kernels           # ... and operators per stage
    python benchmarks/profile_methods.py FlatQuant --epochs 20 --samples 2 --seq 16 --bs 1 \
        --shape 64,192,4,2,16 --no-stages                              # per-step overhead (GPU proxy)
    python benchmarks/profile_methods.py OsPlus --blocks 1 --samples 8  # candidates scored, time each

The model: hidden 576, MLP 1536, 9 heads of 64, 3 kv heads (SmolLM2-135M; `--shape`), `--blocks`
blocks, random weights (a few norm channels x 20, so activations have outliers); calibration
`--samples` x `--seq` random tokens in batches of `--bs`; W`--bits`A`--bits` symmetric, per_channel
weights, per_token activations. Methods run through the block-wise pipeline as in a real run
(observe, prepare_block, process_block). Stage times are inclusive wall times of the wrapped
functions (nested stages overlap; on CUDA every wrapped call synchronizes). `--kernels` counts the
aten operators that are not views (about one kernel launch each on a GPU), forward and backward,
by innermost stage: a SmolLM2-sized training step is bound by launches on a GPU, not arithmetic,
and a tiny `--shape` keeps the operators and leaves their CPU overhead. On CPU use `--threads 1`
(the default) on a shared machine: with more, every small multi-threaded op waits for a
descheduled thread (a 48 x 48 solve took 24 ms instead of 0.16 ms here).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llmc.config import load_config
from llmc.methods import get_method
from llmc.methods.lifecycle import ModelContext
from llmc.models import get_adapter
from llmc.pipeline import BlockwisePipeline, capture_block_inputs

SECONDS: dict[str, float] = collections.defaultdict(float)
CALLS: dict[str, int] = collections.defaultdict(int)
STACK: list[str] = ["other"]
OPS: dict[str, int] = collections.defaultdict(int)
"""Non-view aten operators run (forward and backward) per innermost stage, with `--kernels`."""


class OpCounter(TorchDispatchMode):
    """Counts the aten operators that are not views (each is about one kernel launch on a GPU)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func not in (torch.ops.aten.detach.default, torch.ops.aten.lift_fresh.default):
            OPS[STACK[-1]] += 1
        return func(*args, **(kwargs or {}))


def build_model(blocks: int, shape: tuple[int, int, int, int, int] = (576, 1536, 9, 3, 64), seed: int = 0
                ) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    hidden, mlp, heads, kv_heads, head_dim = shape
    config = LlamaConfig(vocab_size=2048, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=blocks,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                         max_position_embeddings=2048, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05, generator=gen)
        for layer in model.model.layers:  # activation outliers: a few channels of every norm x 20
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[torch.randperm(hidden, generator=gen)[:6]] *= 20
    return model


def timer(owner: object, attr: str, stage: str, device: torch.device) -> None:
    """Wrap `owner.attr` so its inclusive wall time adds to SECONDS[stage]."""
    inner = getattr(owner, attr)
    sync = device.type == "cuda"

    @functools.wraps(inner)
    def wrapped(*args, **kwargs):
        if sync:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        STACK.append(stage)
        try:
            return inner(*args, **kwargs)
        finally:
            STACK.pop()
            if sync:
                torch.cuda.synchronize(device)
            SECONDS[stage] += time.perf_counter() - start
            CALLS[stage] += 1

    setattr(owner, attr, wrapped)


def instrument(method_name: str, device: torch.device) -> None:
    from llmc.quant import fake_linear

    timer(fake_linear.FakeQuantLinear, "forward", "linear forward (all of it)", device)
    timer(fake_linear.FakeQuantLinear, "fake_weight", "weight fake-quant (incl. LWC)", device)
    timer(fake_linear.FakeQuantLinear, "quantize_input", "act fake-quant (incl. LAC)", device)
    if method_name == "FlatQuant":
        from llmc.methods import flatquant
        from llmc.quant import affine

        timer(flatquant.FlatQuant, "_train", "train (all epochs)", device)
        timer(flatquant.FlatQuant, "_merge", "merge", device)
        timer(affine.KroneckerAffine, "forward", "input transform x(d)P", device)
        timer(affine.KroneckerAffine, "transform_weight", "weight transform W/d P^-T", device)
        for name in ("_Factor", "KroneckerFactor"):
            if hasattr(affine, name):
                timer(getattr(affine, name), "matrix_and_inverse_t", "P_i and P_i^-T (Cayley)", device)
        if hasattr(affine, "factor_matrices"):  # the batched training step
            timer(affine, "factor_matrices", "P and P^-T per step (batched)", device)
            timer(affine._TrainedGroup, "_quantized_inputs", "group input fake-quant (LAC)", device)
            timer(affine._TrainedGroup, "_forward", "linear forward (all of it)", device)
            timer(affine.TrainedBlock, "_step_weights", "weights of the step (transform, LWC)", device)
        timer(torch.Tensor, "backward", "backward", device)
        timer(torch.optim.AdamW, "step", "optimizer step", device)
    if method_name in ("OsPlus", "SmoothQuant", "AWQ"):
        module = __import__(f"llmc.methods.{method_name.lower()}", fromlist=["x"])
        cls = getattr(module, method_name)
        for attr in ("search", "fold", "search_scale", "_scale_group", "_clip_group"):
            if hasattr(cls, attr):
                timer(cls, attr, f"{method_name}.{attr}", device)
        if hasattr(module, "output_error"):
            timer(module, "output_error", "inspect-module error (one candidate)", device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("method")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--bs", type=int, default=8)
    ap.add_argument("--bits", type=int, default=4, help="weight and activation bits (WxAx)")
    ap.add_argument("--epochs", type=int, default=1, help="FlatQuant: epochs per block")
    ap.add_argument("--special", default="{}", help="quant.special as JSON")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ops", action="store_true", help="count operator calls with torch.profiler")
    ap.add_argument("--shape", default="576,1536,9,3,64",
                    help="hidden,mlp,heads,kv_heads,head_dim (SmolLM2-135M; a tiny one such as 64,192,4,2,16 keeps "
                    "the operators and leaves their overhead: a proxy of a launch-bound GPU step)")
    ap.add_argument("--kernels", action="store_true",
                    help="count non-view aten operators per stage (forward and backward; slow)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (1: on a shared, busy machine every multi-threaded op waits for a descheduled thread)")
    ap.add_argument("--no-stages", action="store_true", help="no per-stage wrappers (plain wall time)")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)

    model = build_model(args.blocks, tuple(int(v) for v in args.shape.split(",")))
    adapter = get_adapter("auto", model.config.model_type)
    special = json.loads(args.special)
    if args.method == "FlatQuant":
        special.setdefault("epochs", args.epochs)
    quant = load_config({"model": {"path": "unused"}, "quant": {
        "method": args.method,
        "weight": {"bit": args.bits, "symmetric": True, "granularity": "per_channel"},
        "act": {"bit": args.bits, "symmetric": True, "granularity": "per_token"},
        "special": special}}).quant
    method = get_method(quant)
    method.prepare_model(ModelContext(model, adapter, device=device, seed=42))
    if not args.no_stages:
        instrument(args.method, device)

    ids = torch.randint(3, 2048, (args.samples, args.seq), generator=torch.Generator().manual_seed(7))
    batches = [{"input_ids": ids[i : i + args.bs], "attention_mask": None} for i in range(0, args.samples, args.bs)]
    model.to(device)
    inputs = capture_block_inputs(model, adapter, batches, device)
    model.model.embed_tokens.to("cpu")

    def process(ctx) -> None:
        method.prepare_block(ctx)
        method.process_block(ctx)

    profiler = (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if args.ops
                else contextlib.nullcontext())
    start = time.perf_counter()
    with profiler, OpCounter() if args.kernels else contextlib.nullcontext():
        pipe = BlockwisePipeline(model, adapter, device, progress=False)
        pipe.run(inputs, process, targets=lambda i: adapter.linear_names(), observe=method.observe)
    total = time.perf_counter() - start

    steps = args.blocks * args.epochs * len(batches) if args.method == "FlatQuant" else 0
    print(f"{args.method} W{args.bits}A{args.bits}, shape {args.shape}, {args.blocks} blocks, {args.samples}x{args.seq} tokens, "
          f"bs {args.bs}, {device} ({torch.get_num_threads()} threads)")
    print(f"total {total:.2f} s; per block: " + ", ".join(f"{s:.2f}" for s in pipe.block_seconds)
          + "; pipeline stages: " + ", ".join(f"{k} {v:.2f}" for k, v in pipe.stage_seconds.items()))
    if steps:
        train = SECONDS["train (all epochs)"] or sum(pipe.stage_seconds.values())
        print(f"training steps: {steps}; per step {train / steps * 1e3:.1f} ms")
    for stage, sec in sorted(SECONDS.items(), key=lambda kv: -kv[1]):
        per = f"{sec / steps * 1e3:8.1f} ms/step" if steps else ""
        print(f"  {stage:38s} {sec:8.2f} s  {CALLS[stage]:7d} calls {per}")
    for key in ("epoch_losses",):
        if getattr(method, key, None):
            print(f"{key}: " + json.dumps({k: [round(x, 6) for x in v] for k, v in getattr(method, key).items()}))
    if args.kernels:
        total_ops = sum(OPS.values())
        print(f"non-view aten operators (innermost stage; backward ops under 'backward'): {total_ops}")
        for stage, n in sorted(OPS.items(), key=lambda kv: -kv[1]):
            per = f"{n / steps:8.0f} per step" if steps else f"{n / args.blocks:8.0f} per block"
            print(f"  {stage:38s} {n:8d} {per}")
    if args.ops:
        events = profiler.key_averages()
        count = sum(e.count for e in events if e.key.startswith("aten::"))
        per = steps or args.blocks
        print(f"aten operator calls: {count} ({count / per:.0f} per {'step' if steps else 'block'}); top 25:")
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:25]:
            print(f"  {e.key:55s} {e.count:8d} calls  self {e.self_cpu_time_total / 1e6:7.2f} s")


if __name__ == "__main__":
    main()
