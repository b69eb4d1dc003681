"""Shared by the benchmark scripts: the real model as a plain safetensors folder, environment facts, and the
accuracy harness's side of llm-compressor (the same calibration ids and eval windows, one subprocess a row)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

from llmc.fetch import default_cache_dir, fetch_smollm2

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ---- the real-model protocol the accuracy and downstream tables share ------------------------------


def add_protocol_arguments(parser: argparse.ArgumentParser, only_help: str) -> None:
    """Calibration (C4), evaluation windows (WikiText-2), device and row selection."""
    parser.add_argument("--windows", type=int, default=40, help="WikiText-2 windows")
    parser.add_argument("--n-samples", type=int, default=128)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--calib-bs", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--only", default="", help=only_help)


def device_name(device: str) -> str:
    """The device `base.device: <device>` runs on (auto: cuda when present)."""
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def calib_section(args: argparse.Namespace) -> dict:
    return {"name": "c4", "n_samples": args.n_samples, "seq_len": args.calib_seq_len, "bs": args.calib_bs,
            "preproc": "general", "seed": 42}


def calib_description(args: argparse.Namespace, files: dict) -> str:
    return (f"bundled C4 sample, {args.n_samples} x {args.calib_seq_len} tokens, general preproc, seed 42 "
            f"(ids sha256/16 {files['calib_sha256_16']})")


def selects(only: str, setting: str, method: str) -> bool:
    """Whether `--only` (comma-separated settings, methods or setting/method; empty: all) picks the row."""
    picked = {s.strip() for s in only.split(",") if s.strip()}
    return not picked or bool({setting, method, f"{setting}/{method}"} & picked)


def smollm2_hf_dir() -> Path:
    """SmolLM2-135M-Instruct dequantized from its GGUF and saved once as float32 safetensors, so
    that tools without GGUF support (the peer) load exactly the same weights."""
    folder = Path(default_cache_dir()) / "models" / "smollm2-135m-instruct-hf"
    if (folder / "config.json").exists() and list(folder.glob("*.safetensors")):
        return folder
    from llmc.config.schema import ModelSection
    from llmc.models import load_model

    src = fetch_smollm2()
    loaded = load_model(ModelSection(type="SmolLM", path=str(src), gguf_file=GGUF, torch_dtype="float32"))
    model, tokenizer = loaded.model, loaded.tokenizer
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def environment() -> dict:
    import transformers

    import llmc

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {
        "device": device,
        "llmc": llmc.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "commit": code_commit(),
    }


def code_commit() -> str | None:
    """The llmc commit measured: $LLMC_COMMIT (set it where the tree is a copy without .git, as on the
    GPU machine), else `git describe` of this checkout, "-dirty" with uncommitted tracked changes."""
    if os.environ.get("LLMC_COMMIT"):
        return os.environ["LLMC_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=root,
                             capture_output=True, text=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def peer_run(model_dir: Path, args: argparse.Namespace, files: dict, setting: str, method: str,
             spec: dict) -> dict:
    """Run llm-compressor on one row's settings (`spec`'s quant/sparse sections; its "peer" entry may
    name another method or a rotation before it); its JSON line, or {"error": its message}."""
    quant, sparse, peer = spec.get("quant"), spec.get("sparse"), spec.get("peer") or {}
    cmd = [args.peer_python, str(Path(__file__).with_name("peer_llmcompressor.py")), "--model", str(model_dir),
           "--calib", str(files["calib"]), "--windows", str(files["windows"]), "--device", args.device_name]
    if sparse:
        cmd += ["--sparse-method", sparse["method"], "--sparsity", str(sparse["weight"].get("sparsity", 0.5)),
                "--mask-structure", sparse["weight"].get("pattern", "0:0").replace("unstructured", "0:0")]
    if quant and peer.get("preset"):  # a compressed-tensors preset scheme (NVFP4A16, MXFP4A16, ...)
        cmd += ["--method", peer.get("method", quant["method"]), "--preset", peer["preset"]]
    elif quant:
        weight, act = quant["weight"], quant.get("act")
        peer_method = peer.get("method", quant["method"])
        cmd += ["--method", peer_method, "--bits", str(weight["bit"]), "--group-size", str(weight["group_size"])]
        if not weight["symmetric"]:
            cmd.append("--asym")
        if peer.get("transform"):
            cmd += ["--transform", peer["transform"]]
        if peer_method == "GPTQ":
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

    from llmc.data import build_calibration, load_eval_text, load_named_documents, tokenize_windows

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
