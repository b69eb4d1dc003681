"""Layer-by-layer comparison of llmc's and llm-compressor's pruned weights on the same calibration ids.

    python benchmarks/compare_masks.py --peer-python .venv-peer/bin/python \
        [--methods Wanda,SparseGPT] [--pattern 2:4] [--n-samples 16] [--seq-len 256] [--work /tmp/cmp]

Both tools prune SmolLM2-135M-Instruct (float32; llmc on `--device`, default CPU) from the same
token ids (bundled C4 sample, general preproc, seed 42, saved to `<work>/calib.pt`): llmc through its Python API
(`llmc.schedule.compress_batches`, the pipeline `llmc run` uses, with llmc's defaults: each
block calibrated on the pruned earlier blocks' outputs), llm-compressor through `oneshot` with
the modifier of `benchmarks/peer_llmcompressor.py`, run by `--peer-python` as a subprocess of this
same file (`--as-peer`). Each side saves every decoder linear's weight; the report gives per
(block, linear) the fraction of weights whose pruned/kept state agrees, and for SparseGPT the
largest absolute difference of the weights, plus for the peer whether every group of M inputs
has at least N zeros. Block 0 sees identical inputs in both tools, so a disagreement there is a
difference in the algorithm (or, for SparseGPT, float rounding: a near-tie decided the other way
changes the rest of that row's sweep); agreement there and divergence later is how inputs propagate.

`--llmc-set KEY=VALUE` passes config overrides to the llmc side (e.g. `sparse.sparsity_out=false`).
`--eval-windows N` also measures WikiText-2 perplexity (first N windows of 2048 tokens, llmc's
evaluator) of both pruned models. `--llmc-order reverse|shuffle:SEED` feeds llmc the same samples
in another order: mathematically the same statistics, only float rounding differs, which measures
how far rounding alone moves masks and perplexity (the peer keeps the saved order);
`--llmc-stats64` does the same by accumulating llmc's input norms / Hessians in float64.
`--reuse-peer` skips the (slow, on CPU) peer run when its weights are already in `--work`.

Measured on 2 CPU cores (16 x 256 tokens): Wanda 2:4 gives bit-identical weights in both tools
(also at 64 x 512, with the order reversed, and with float64 norms); SparseGPT 2:4 agrees in block 0
up to rounding (62 of 3.5M weights differ) and drifts to ~90% agreement by block 29, exactly as llmc
drifts from itself with float64 Hessians (8.6% of weights differ; WikiText-2 8 windows: llmc 104.01,
llmc float64 104.84, peer 103.28).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def decoder_linears(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`{"<block>.<linear>": weight}` (float32, CPU) of every linear inside a decoder block."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            out[name.split(".layers.", 1)[1]] = module.weight.detach().float().cpu().clone()
    return out


# ---------------------------------------------------------------- peer side (llm-compressor's venv)

def peer_main(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(HERE))
    from datasets import Dataset
    from llmcompressor import oneshot
    from peer_llmcompressor import sparse_recipe
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # (peer_llmcompressor's allow_cpu_only is for AWQ; with it, the pruning modifiers' memory logging
    # asks a device that does not exist. Pruning runs on CPU without it.)
    torch.manual_seed(0)
    calib = torch.load(args.calib)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    ns = argparse.Namespace(sparse_method=args.method, sparsity=0.5,
                            mask_structure=args.pattern.replace("unstructured", "0:0"))
    start = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, dataset=data, recipe=sparse_recipe(ns),
            num_calibration_samples=calib.shape[0], max_seq_length=calib.shape[1],
            shuffle_calibration_samples=False)
    torch.save(decoder_linears(model), args.out)
    print(json.dumps({"seconds": time.perf_counter() - start}))


# ---------------------------------------------------------------- llmc side

def calibration_ids(model_dir: Path, n_samples: int, seq_len: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    from llmc.data import build_calibration, load_named_documents

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    docs = load_named_documents("c4", "calib")
    return build_calibration(docs, tokenizer, n_samples, seq_len, -1, "general", 42)[0]["input_ids"]


def llmc_prune(model_dir: Path, ids: torch.Tensor, method: str, pattern: str, overrides: list[str],
               bs: int = 8, stats64: bool = False, device: str = "cpu") -> tuple[torch.nn.Module, object, float]:
    from llmc.config import load_config
    from llmc.models import load_model
    from llmc.runner import seed_everything
    from llmc.schedule import build_methods, compress_batches

    cfg = load_config({
        "base": {"seed": 42, "device": device},
        "model": {"type": "SmolLM", "path": str(model_dir), "torch_dtype": "float32"},
        "calib": {"name": "c4", "n_samples": ids.shape[0], "seq_len": ids.shape[1], "bs": bs,
                  "preproc": "general", "seed": 42},
        "sparse": {"method": method, "weight": {"sparsity": 0.5, "pattern": pattern}},
    }, overrides)
    seed_everything(42)
    if stats64:
        float64_statistics()
    loaded = load_model(cfg.model)
    batches = [{"input_ids": ids[i:i + bs], "attention_mask": None} for i in range(0, ids.shape[0], bs)]
    start = time.perf_counter()
    compress_batches(cfg, loaded.model, loaded.adapter, build_methods(cfg), torch.device(device), batches,
                     progress=False)
    return loaded.model, loaded.adapter, time.perf_counter() - start


def float64_statistics() -> None:
    """Accumulate Wanda's input norms and SparseGPT's Hessians in float64 (then used as llmc uses
    them): the same statistics with less rounding, a rounding-only change of the llmc side."""
    import llmc.methods.hessian as hessian
    import llmc.methods.sparse_base as sparse_base

    def sq_sum_adder(sums, device):
        def add(name, rows):
            sq = rows.double().pow(2).sum(dim=0).to(device)
            sums[name] = sq if name not in sums else sums[name] + sq
        return add

    def add_gram(total, x):
        x = x.double()
        return x.T @ x if total is None else total.add_(x.T @ x)

    sparse_base.sq_sum_adder = sq_sum_adder
    hessian.add_gram = add_gram


def reorder(ids: torch.Tensor, order: str) -> torch.Tensor:
    if order == "same":
        return ids
    if order == "reverse":
        return ids.flip(0)
    if order.startswith("shuffle:"):
        return ids[torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(int(order[8:])))]
    raise SystemExit(f"--llmc-order: same, reverse or shuffle:SEED, not {order!r}")


def perplexity(model: torch.nn.Module, adapter, model_dir: Path, n_windows: int, device: str = "cpu") -> float:
    from transformers import AutoTokenizer

    from llmc.data import load_eval_text, tokenize_windows
    from llmc.eval.perplexity import evaluate_perplexity

    windows = tokenize_windows(load_eval_text("wikitext2"), AutoTokenizer.from_pretrained(model_dir), 2048, n_windows)
    return evaluate_perplexity(model, adapter, windows, torch.device(device), progress=False,
                               dataset="wikitext2", position="transformed").ppl


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Write `decoder_linears`-style weights into `model` (same architecture)."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                module.weight.copy_(weights[name.split(".layers.", 1)[1]])


# ---------------------------------------------------------------- comparison

def compare(ours: dict[str, torch.Tensor], peer: dict[str, torch.Tensor], n_m: tuple[int, int] | None,
            values: bool) -> list[dict]:
    rows = []
    for key in ours:
        a, b = ours[key], peer[key]
        block, linear = key.split(".", 1)
        row = {"block": int(block), "linear": linear, "agree": float(((a == 0) == (b == 0)).float().mean()),
               "zeros_llmc": float((a == 0).float().mean()), "zeros_peer": float((b == 0).float().mean())}
        if n_m is not None:
            n, m = n_m
            row["peer_nm_ok"] = float(((b == 0).reshape(b.shape[0], -1, m).sum(-1) >= n).float().mean())
        if values:
            both = (a != 0) & (b != 0)
            row["max_abs_diff"] = float((a - b).abs().max())
            row["max_abs_diff_kept"] = float((a - b)[both].abs().max()) if both.any() else 0.0
        rows.append(row)
    return rows


def print_table(method: str, pattern: str, rows: list[dict]) -> None:
    print(f"\n## {method} {pattern}: mask agreement per layer (fraction of weights pruned/kept alike)")
    blocks = sorted({r["block"] for r in rows})
    head = "block " + " ".join(f"{ln.split('.')[-1]:>9}" for ln in LINEARS)
    print(head)
    by = {(r["block"], r["linear"]): r for r in rows}
    for b in blocks:
        print(f"{b:5d} " + " ".join(f"{by[(b, ln)]['agree']:9.4f}" if (b, ln) in by else " " * 9 for ln in LINEARS))
    if "max_abs_diff" in rows[0]:
        print("max |w_llmc - w_peer| per layer")
        print(head)
        for b in blocks:
            print(f"{b:5d} " + " ".join(f"{by[(b, ln)]['max_abs_diff']:9.2e}" if (b, ln) in by else " " * 9
                                      for ln in LINEARS))
    if "peer_nm_ok" in rows[0]:
        worst = min(r["peer_nm_ok"] for r in rows)
        print(f"peer: fraction of M-groups with >= N zeros, worst layer: {worst:.4f}")
    print(f"zeros: llmc {sum(r['zeros_llmc'] for r in rows) / len(rows):.4f}, "
          f"peer {sum(r['zeros_peer'] for r in rows) / len(rows):.4f} (mean over layers)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--as-peer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--calib", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help="HF folder (default: the benchmarks' SmolLM2 folder)")
    parser.add_argument("--peer-python", default=".venv-peer/bin/python")
    parser.add_argument("--methods", default="Wanda,SparseGPT")
    parser.add_argument("--pattern", default="2:4", help="2:4 (N:M) or unstructured")
    parser.add_argument("--n-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--work", default="/tmp/llmc_compare_masks")
    parser.add_argument("--reuse-peer", action="store_true", help="reuse <work>/peer_*.pt from an earlier run")
    parser.add_argument("--llmc-set", action="append", default=[], help="llmc config override KEY=VALUE")
    parser.add_argument("--llmc-order", default="same", help="same, reverse or shuffle:SEED (llmc side only)")
    parser.add_argument("--llmc-stats64", action="store_true",
                        help="llmc side: accumulate input norms / Hessians in float64 (rounding-only change)")
    parser.add_argument("--device", default="cpu", help="llmc's device (the peer picks its own: CUDA if present)")
    parser.add_argument("--eval-windows", type=int, default=0, help="also WikiText-2 ppl on this many windows")
    args = parser.parse_args()
    if args.as_peer:
        return peer_main(args)

    sys.path.insert(0, str(HERE))
    from common import smollm2_hf_dir

    model_dir = Path(args.model) if args.model else smollm2_hf_dir()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ids = calibration_ids(model_dir, args.n_samples, args.seq_len)
    calib = work / "calib.pt"
    torch.save(ids, calib)
    n_m = tuple(int(x) for x in args.pattern.split(":")) if ":" in args.pattern else None
    summary = {}
    for method in args.methods.split(","):
        tag = f"{method}_{args.pattern.replace(':', 'of')}"
        peer_file = work / f"peer_{tag}.pt"
        if not (args.reuse_peer and peer_file.exists()):
            cmd = [args.peer_python, str(Path(__file__).resolve()), "--as-peer", "--model", str(model_dir),
                   "--calib", str(calib), "--out", str(peer_file), "--method", method, "--pattern", args.pattern]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise SystemExit(f"peer failed:\n{proc.stderr[-3000:]}")
            print(f"peer {method} {args.pattern}: {json.loads(proc.stdout.strip().splitlines()[-1])}", flush=True)
        model, adapter, seconds = llmc_prune(model_dir, reorder(ids, args.llmc_order), method, args.pattern,
                                             args.llmc_set, stats64=args.llmc_stats64,
                                             device=args.device)
        print(f"llmc {method} {args.pattern}: {seconds:.1f} s", flush=True)
        ours, peer = decoder_linears(model), torch.load(peer_file)
        torch.save(ours, work / f"llmc_{tag}.pt")
        rows = compare(ours, peer, n_m, values=method == "SparseGPT")
        print_table(method, args.pattern, rows)
        differ = sum(int(((ours[k] == 0) != (peer[k] == 0)).sum()) for k in ours)
        print(f"weights pruned by one tool only: {differ} of {sum(w.numel() for w in ours.values())}; "
              f"identical weights: {all(torch.equal(ours[k], peer[k]) for k in ours)}")
        summary[tag] = {"rows": rows, "differ": differ}
        if args.eval_windows:
            ppl_llmc = perplexity(model, adapter, model_dir, args.eval_windows, args.device)
            load_weights(model, peer)
            ppl_peer = perplexity(model, adapter, model_dir, args.eval_windows, args.device)
            print(f"WikiText-2 ppl ({args.eval_windows} windows): llmc {ppl_llmc:.3f}, peer {ppl_peer:.3f} "
                  f"({100 * (ppl_llmc / ppl_peer - 1):+.2f}%)", flush=True)
            summary[tag].update(ppl_llmc=ppl_llmc, ppl_peer=ppl_peer)
    report = work / f"report_{args.llmc_order.replace(':', '')}{'_stats64' if args.llmc_stats64 else ''}.json"
    report.write_text(json.dumps(summary, indent=1))
    print(f"\nper-layer rows: {report}")


if __name__ == "__main__":
    main()
