"""Shared by the benchmark scripts: the real model as a plain safetensors folder, environment facts."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

from llmc.fetch import default_cache_dir, fetch_smollm2

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
