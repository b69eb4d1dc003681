"""Write outputs atomically: everything goes to a temporary sibling folder, renamed at the end.

`save_trans` is the transformed float model, `save_fake` the model with weights replaced
by their fake-quantized values; both are ordinary transformers folders (safetensors).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from llmc.errors import ConfigError
from llmc.models.adapter import ModelAdapter
from llmc.quant.fake_linear import FakeQuantLinear, fake_quant_modules

log = logging.getLogger("llmc")

TRANS_DIR = "transformed_model"
FAKE_DIR = "fake_quant_model"


def check_output_path(save_path: str | None, overwrite: bool) -> Path | None:
    """Refuse, before any work, an output folder that exists (unless overwrite) or cannot be created."""
    if not save_path:
        return None
    path = Path(os.path.expanduser(save_path)).resolve()
    if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"save.save_path {path} already exists; choose a new folder or set save.overwrite: true")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(
            f"save.save_path {path} cannot be created: {parent} is a file, not a folder; "
            f"choose another save.save_path"
        )
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"save.save_path {path} cannot be created (no write permission in {parent})")
    return path


@contextlib.contextmanager
def atomic_output_dir(final: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder next to `final`; on success it replaces `final`, on failure it is removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        if not overwrite and (not final.is_dir() or any(final.iterdir())):
            shutil.rmtree(tmp, ignore_errors=True)
            raise ConfigError(f"save.save_path {final} appeared during the run; set save.overwrite: true")
        shutil.rmtree(final) if final.is_dir() else final.unlink()
    os.replace(tmp, final)


def linear_weight(module: nn.Module, fake: bool) -> torch.Tensor:
    """A linear's weight as saved: fake-quantized when `fake` and the linear is quantized."""
    if fake and isinstance(module, FakeQuantLinear):
        return module.fake_weight().detach()
    return module.weight.detach()


def model_state_dict(model: nn.Module, fake: bool) -> dict[str, torch.Tensor]:
    """The model's state dict with original key names; fake-quantized weights if `fake`."""
    state = model.state_dict()
    if fake:
        for name, module in fake_quant_modules(model):
            with torch.no_grad():
                state[f"{name}.weight"] = module.fake_weight().detach()
    return state


def save_hf_model(
    model: nn.Module, tokenizer: object, folder: Path, fake: bool, adapter: ModelAdapter | None = None
) -> None:
    """A transformers folder in the checkpoint's own layout (the adapter's `restore`)."""
    with adapter.checkpoint_layout(model, lambda m: linear_weight(m, fake)) if adapter else contextlib.nullcontext():
        state = model_state_dict(model, fake)
        model.save_pretrained(folder, state_dict=state, safe_serialization=True)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(folder)
    copy_processor_files(getattr(model, "name_or_path", None), folder)
    log.info("wrote %s model to %s", "fake-quantized" if fake else "transformed", folder)


PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
                   "chat_template.json", "chat_template.jinja")


def copy_processor_files(source: str | None, folder: Path) -> list[str]:
    """Copy the source checkpoint's processor files (image processor, processor, chat template)
    that the tokenizer did not write, so the saved folder loads with its processor."""
    copied = []
    for name in PROCESSOR_FILES if source else ():
        path = _source_file(str(source), name)
        if path is not None and not (folder / name).exists():
            shutil.copyfile(path, folder / name)
            copied.append(name)
    return copied


def _source_file(source: str, name: str) -> str | None:
    """`name` in a local checkpoint folder, or in the hub cache for a hub id (never downloads)."""
    if os.path.isdir(source):
        path = os.path.join(source, name)
        return path if os.path.isfile(path) else None
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(source, name)
    except (ValueError, OSError):
        return None
    return path if isinstance(path, str) else None


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
