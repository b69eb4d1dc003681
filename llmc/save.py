"""Write outputs safely: everything goes to a temporary sibling folder, renamed in at the end.

`save_trans` is the transformed float model, `save_fake` the model with weights replaced
by their fake-quantized values; both are ordinary transformers folders (safetensors).

Replace protocol (the invariant: save_path always holds one complete output, the old or the new):

1. the run writes into `.NAME.tmp-<pid>-<host>-<random>` beside save_path, `results.json` last
   (the marker of a complete output; `overwrite` also recognises llmc's own folders by it);
2. the old save_path is renamed aside to `.NAME.old-<pid>-<host>-<random>`;
3. the temporary folder is renamed to save_path (the commit point);
4. the old folder is deleted.

A run killed before step 3 wrote nothing; one killed after it wrote its output. A kill between
steps 2 and 3 leaves save_path missing and the old output aside: the next run's start
(`check_output_path` -> `recover_output`) renames it back. Temporary and old folders whose
process is dead (same host, pid in the name) are removed at start, named in one log line.
SIGINT/SIGTERM are held back during steps 2-3 (main thread), so an interrupt never lands between them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from llmc.errors import ConfigError
from llmc.faults import kill_point
from llmc.models.adapter import ModelAdapter
from llmc.quant.fake_linear import FakeQuantLinear, fake_quant_modules

log = logging.getLogger("llmc")

TRANS_DIR = "transformed_model"
FAKE_DIR = "fake_quant_model"
RESULTS = "results.json"
"""Written last into every output: a folder holding it (with `llmc_version`) is a complete llmc output."""


def check_output_path(save_path: str | None, overwrite: bool, model_path: str | Path | None = None) -> Path | None:
    """Refuse, before any work, an output folder that exists (unless overwrite and it is llmc's own
    output, away from the input model) or cannot be created; first recover/clean after killed runs."""
    if not save_path:
        return None
    path = Path(os.path.expanduser(save_path)).resolve()
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(
            f"save.save_path {path} cannot be created: {parent} is a file, not a folder; "
            f"choose another save.save_path"
        )
    if parent == path.parent:
        recover_output(path)
    check_replaceable(path, overwrite, model_path)
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"save.save_path {path} cannot be created (no write permission in {parent})")
    return path


def check_replaceable(path: Path, overwrite: bool, model_path: str | Path | None = None) -> None:
    """ConfigError unless `path` is absent, an empty folder, or (with overwrite) an llmc output
    that neither holds nor lies inside the input model."""
    if not path.exists() and not path.is_symlink():
        return
    model = _local_path(model_path)
    if model is not None and (model == path or path in model.parents or model in path.parents):
        where = "is" if model == path else "contains" if path in model.parents else "lies inside"
        raise ConfigError(
            f"save.save_path {path} {where} the input model {model}; llmc never replaces it "
            f"(not even with save.overwrite: true): choose a save.save_path outside the model folder"
        )
    if not path.is_dir():
        raise ConfigError(
            f"save.save_path {path} is a file, not an output folder; llmc never replaces it "
            f"(not even with save.overwrite: true): choose another save.save_path or remove it yourself"
        )
    try:
        if not any(path.iterdir()):
            return
    except OSError as exc:
        raise ConfigError(f"save.save_path {path} cannot be read ({exc.strerror}); choose another save.save_path") from None
    if not is_llmc_output(path):
        raise ConfigError(
            f"save.save_path {path} already exists and is not an llmc output (no results.json from llmc), "
            f"so not even save.overwrite: true replaces it; choose a new folder or remove it yourself"
        )
    if not overwrite:
        raise ConfigError(f"save.save_path {path} already exists; choose a new folder or set save.overwrite: true")


def is_llmc_output(folder: Path) -> bool:
    """A folder llmc wrote completely: its results.json parses and names the llmc version."""
    try:
        data = json.loads((folder / RESULTS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "llmc_version" in data


def _local_path(path: str | Path | None) -> Path | None:
    if not path:
        return None
    local = Path(os.path.expanduser(str(path)))
    return local.resolve() if local.exists() else None


_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _work_name(final: Path, kind: str) -> str:
    """Prefix of this process's temporary (`tmp`) or set-aside (`old`) folder for `final`."""
    return f".{final.name}.{kind}-{os.getpid()}-{_HOST}-"


def work_folders(final: Path) -> list[tuple[Path, str, int]]:
    """(folder, "tmp" or "old", pid) of this host's temporary folders for `final` (never others,
    e.g. `.NAME.llmc-resume`)."""
    pattern = re.compile(re.escape(f".{final.name}.") + rf"(tmp|old)-(\d+)-{_HOST}-[^/]+")
    found = []
    with contextlib.suppress(OSError):
        for entry in final.parent.iterdir():
            match = pattern.fullmatch(entry.name)
            if match and entry.is_dir() and not entry.is_symlink():
                found.append((entry, match.group(1), int(match.group(2))))
    return sorted(found)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OSError, OverflowError):
        return False
    return True


def recover_output(final: Path) -> None:
    """After a killed run: put a set-aside old output back if save_path is missing, and remove the
    temporary/old folders of dead processes (one log line). Live processes' folders are left alone."""
    stale = [(folder, kind) for folder, kind, pid in work_folders(final) if not _alive(pid)]
    if not final.exists() and not final.is_symlink():
        olds = [folder for folder, kind in stale if kind == "old" and is_llmc_output(folder)]
        if olds:
            newest = max(olds, key=lambda f: f.stat().st_ctime)
            try:
                os.rename(newest, final)
            except OSError as exc:
                raise ConfigError(f"save.save_path {final} is missing and its earlier output {newest} "
                                  f"cannot be renamed back ({exc.strerror}); rename it back yourself") from None
            stale.remove((newest, "old"))
            log.warning("restored %s from %s (a run was killed while replacing it)", final, newest.name)
    if stale:
        log.warning("removing %d temporary folder(s) of killed llmc runs in %s: %s", len(stale), final.parent,
                    ", ".join(folder.name for folder, _ in stale))
        for folder, _ in stale:
            shutil.rmtree(folder, ignore_errors=True)


def _umask() -> int:
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def umask_permissions(folder: Path) -> None:
    """Folders 0777 & ~umask, files 0666 & ~umask (kept executable bits aside): a serving account
    reads the output; transformers writes safetensors shards through 0600 temporary files."""
    mask = _umask()
    for root, _dirs, files in os.walk(folder):
        os.chmod(root, (0o777 & ~mask) | (os.stat(root).st_mode & 0o2000))  # keeps a setgid bit
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, (0o666 | os.stat(path).st_mode & 0o111) & ~mask)


_DEFERRED = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back (their handlers run on exit) so an interrupt never splits the two
    renames. Python-level, not pthread_sigmask: any thread (torch's) may receive a process signal."""
    pending: list[int] = []
    previous = {}
    with contextlib.suppress(ValueError):  # not the main thread: nothing to hold
        for sig in _DEFERRED:
            if signal.getsignal(sig) is not None:
                previous[sig] = signal.signal(sig, lambda signum, _frame: pending.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(pending):
            signal.raise_signal(sig)


@contextlib.contextmanager
def atomic_output_dir(final: Path, overwrite: bool, model_path: str | Path | None = None) -> Iterator[Path]:
    """Yield a temporary folder next to `final` (permissions from the umask); when the body has
    written results.json into it, it replaces `final` (see the module's protocol); on failure it is removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_work_name(final, "tmp"), dir=final.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700
        yield tmp
        if not is_llmc_output(tmp):
            raise RuntimeError(f"internal error: {tmp} has no results.json; output not complete")
        umask_permissions(tmp)
        kill_point("replace:written")
        recover_output(final)
        check_replaceable(final, overwrite, model_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    committed = False
    try:
        with _signals_held():
            if final.exists() or final.is_symlink():
                old = final.parent / (_work_name(final, "old") + secrets.token_hex(4))
                os.rename(final, old)
                kill_point("replace:aside")
            os.rename(tmp, final)
            committed = True
            kill_point("replace:renamed")
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
            kill_point("replace:done")
    except BaseException as exc:
        if committed:  # e.g. a signal held back during the renames: the new output is complete
            exc.llmc_output = final
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        else:
            if old is not None and not final.exists():
                os.rename(old, final)
            shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    save_tokenizer_files(model, tokenizer, folder)
    log.info("wrote %s model to %s", "fake-quantized" if fake else "transformed", folder)


def save_tokenizer_files(model: nn.Module, tokenizer: object, folder: Path) -> None:
    """The tokenizer beside a saved model, and the processor files it does not write."""
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(folder)
    copy_processor_files(getattr(model, "name_or_path", None), folder)


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
