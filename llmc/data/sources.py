"""Where calibration and evaluation documents come from: local files, bundled copies, the HF hub.

Every user-facing problem (missing file, unknown format, missing field, no network) raises
`DataError` with a one-line message naming the problem and the fix.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

from llmc.errors import DataError

# Plain-text suffixes: one document per non-blank line. `.raw`/`.tokens` are WikiText's own names.
_TEXT_SUFFIXES = (".txt", ".txt.gz", ".raw", ".tokens")
SUPPORTED_SUFFIXES: tuple[str, ...] = (
    *_TEXT_SUFFIXES,
    ".json",
    ".json.gz",
    ".jsonl",
    ".jsonl.gz",
    ".parquet",
)
DATASET_NAMES: tuple[str, ...] = ("pileval", "c4", "wikitext2", "ptb", "custom")
_PURPOSES = ("calib", "eval")
_ASSETS = Path(__file__).resolve().parent.parent / "assets"
_BUNDLED: dict[tuple[str, str], Path] = {
    # Calibration must never see the evaluation split: wikitext2 calib is the validation text.
    ("wikitext2", "calib"): _ASSETS / "wikitext2" / "wiki.valid.tokens",
    ("wikitext2", "eval"): _ASSETS / "wikitext2" / "wiki.test.raw",
    ("c4", "calib"): _ASSETS / "c4" / "c4-sample.00000-of-00001.json.gz",
    ("c4", "eval"): _ASSETS / "c4" / "c4-sample.00000-of-00001.json.gz",
}
_C4 = "allenai/c4"
_C4_TRAIN = {"train": "en/c4-train.00000-of-01024.json.gz"}
_C4_VALID = {"validation": "en/c4-validation.00000-of-00008.json.gz"}
# (name, purpose) -> (load_dataset args, load_dataset kwargs, text field); same sources as llmc.
_HUB: dict[tuple[str, str], tuple[tuple[str, ...], dict[str, Any], str]] = {
    ("pileval", "calib"): (("mit-han-lab/pile-val-backup",), {"split": "validation"}, "text"),
    ("c4", "calib"): ((_C4,), {"data_files": _C4_TRAIN, "split": "train"}, "text"),
    ("c4", "eval"): ((_C4,), {"data_files": _C4_VALID, "split": "validation"}, "text"),
    ("wikitext2", "calib"): (("wikitext", "wikitext-2-raw-v1"), {"split": "train"}, "text"),
    ("wikitext2", "eval"): (("wikitext", "wikitext-2-raw-v1"), {"split": "test"}, "text"),
    ("ptb", "calib"): (("ptb_text_only", "penn_treebank"), {"split": "train"}, "sentence"),
    ("ptb", "eval"): (("ptb_text_only", "penn_treebank"), {"split": "test"}, "sentence"),
}


def _suffix(path: Path) -> str:
    """Return the supported suffix of `path` (e.g. ".jsonl.gz"), or "" if none matches."""
    name = path.name.lower()
    # Longest first so ".jsonl.gz" wins over ".gz"-less matches.
    for suffix in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return ""


def _read_text(path: Path) -> str:
    """Read a (possibly gzipped) UTF-8 file without translating newlines."""
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
                return f.read()
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise DataError(
            f"cannot read {path} ({type(e).__name__}: {e}); check the file is readable UTF-8 text "
            "(gzip only for names ending .gz)"
        ) from None


def _record_text(record: Any, text_key: str, where: str) -> str:
    """Extract the document text from one JSON record (a string or an object)."""
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise DataError(
            f"{where} is a {type(record).__name__}, not an object or a string; "
            f"store one object with a '{text_key}' field (or one string) per record"
        )
    if text_key not in record:
        fields = ", ".join(sorted(map(str, record))) or "none"
        raise DataError(
            f"{where} has no field '{text_key}' (available fields: {fields}); "
            "set text_key to the field holding the document text"
        )
    value = record[text_key]
    if not isinstance(value, str):
        raise DataError(
            f"{where} field '{text_key}' is a {type(value).__name__}, not a string; "
            "set text_key to a field holding text"
        )
    return value


def _read_json(path: Path, text_key: str) -> list[str]:
    """Read a `.json` file: a list of objects or of strings, or JSON lines (as C4 ships them)."""
    text = _read_text(path)
    if not text.lstrip().startswith("["):
        return _parse_jsonl(text, path, text_key)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path} is not valid JSON ({e}); fix the file or store one JSON record per line"
        ) from None
    return [_record_text(r, text_key, f"{path} record {i}") for i, r in enumerate(data)]


def _parse_jsonl(text: str, path: Path, text_key: str) -> list[str]:
    """Parse JSON lines: one record per non-blank line."""
    docs: list[str] = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path} line {lineno} is not valid JSON ({e}); put one JSON record per line "
                "(or a single JSON list in a .json file)"
            ) from None
        docs.append(_record_text(record, text_key, f"{path} line {lineno}"))
    return docs


def _read_lines(path: Path) -> list[str]:
    """Read a text file: each non-blank line (trailing newline removed) is one document."""
    lines = (line.removesuffix("\r") for line in _read_text(path).split("\n"))
    return [line for line in lines if line.strip()]


def _read_parquet(path: Path, text_key: str) -> list[str]:
    """Read the `text_key` column of a parquet file (pyarrow is an optional dependency)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"reading {path} needs pyarrow, which is not installed; run `pip install pyarrow`"
        ) from None
    try:
        names = pq.read_schema(path).names
        column = pq.read_table(path, columns=[text_key])[text_key].to_pylist() if text_key in names else None
    except Exception as e:  # noqa: BLE001 - pyarrow raises several unrelated types for corrupt files
        raise DataError(
            f"cannot read parquet file {path} ({type(e).__name__}: {e}); check the file"
        ) from None
    if column is None:
        raise DataError(
            f"{path} has no column '{text_key}' (available fields: {', '.join(names) or 'none'}); "
            "set text_key to the column holding the document text"
        )
    return [_record_text(v, text_key, f"{path} row {i}") for i, v in enumerate(column) if v is not None]


def _read_file(path: Path, text_key: str) -> list[str]:
    """Dispatch on the file's suffix."""
    suffix = _suffix(path)
    if suffix in _TEXT_SUFFIXES:
        return _read_lines(path)
    if suffix.removesuffix(".gz") == ".json":
        return _read_json(path, text_key)
    if suffix.removesuffix(".gz") == ".jsonl":
        return _parse_jsonl(_read_text(path), path, text_key)
    if suffix == ".parquet":
        return _read_parquet(path, text_key)
    raise DataError(
        f"unsupported data file {path}; use one of {', '.join(SUPPORTED_SUFFIXES)} (or a folder of them)"
    )


def read_documents(path: str | Path, text_key: str = "text", *, config_key: str = "path") -> list[str]:
    """Read documents from a file or a folder of supported files (read in name order).

    `.txt`/`.raw`/`.tokens`: each non-blank line is a document. `.json` (a list of objects or
    strings) and `.jsonl`, either optionally gzipped, and `.parquet`: the `text_key` field.
    `config_key` is the config key named in error messages (e.g. "calib.path").
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(
            f"data path {path} not found; set {config_key} to an existing "
            ".txt/.json/.jsonl(.gz)/.parquet file or a folder of them"
        )
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and _suffix(p))
        if not files:
            raise DataError(
                f"folder {path} has no supported data files; add files ending in "
                f"{', '.join(SUPPORTED_SUFFIXES)} or point {config_key} at a file"
            )
        docs = [doc for f in files for doc in _read_file(f, text_key)]
    else:
        docs = _read_file(path, text_key)
    if not any(doc.strip() for doc in docs):
        raise DataError(f"no documents found in {path}; point {config_key} at a file with non-empty text")
    return docs


def wikitext2_test_text_from_raw(raw: str) -> str:
    """Rebuild the GPTQ/AWQ WikiText-2 test string `"\\n\\n".join(rows)` from `wiki.test.raw`.

    The HF `wikitext-2-raw-v1` rows are the raw file's lines with their newline kept, and
    whitespace-only lines become "". The final empty piece after the last newline is no row.
    """
    rows = [(line + "\n") if line.strip() else "" for line in raw.split("\n")[:-1]]
    return "\n\n".join(rows)


def _check_purpose(purpose: str) -> None:
    if purpose not in _PURPOSES:
        raise DataError(f"unknown data purpose '{purpose}'; use one of {', '.join(_PURPOSES)}")


def _check_name(name: str) -> None:
    if name not in DATASET_NAMES:
        raise DataError(f"unknown data set '{name}'; use one of {', '.join(DATASET_NAMES)}")


def bundled_path(name: str, purpose: str) -> Path:
    """Return the bundled copy of data set `name` for `purpose` ("calib" or "eval")."""
    _check_purpose(purpose)
    path = _BUNDLED.get((name, purpose))
    if path is None:
        raise DataError(
            f"no bundled copy of '{name}' for {purpose}; set {purpose}.path to a local file "
            f"or {purpose}.download: true"
        )
    if not path.exists():
        raise DataError(
            f"bundled {name} file {path} is missing from the llmc install; reinstall llmc, "
            f"or set {purpose}.path to a local file or {purpose}.download: true"
        )
    return path


def download_documents(name: str, purpose: str) -> list[str]:
    """Fetch data set `name` for `purpose` from the Hugging Face hub with `datasets`."""
    _check_purpose(purpose)
    _check_name(name)
    source = _HUB.get((name, purpose))
    if source is None:
        raise DataError(
            f"'{name}' has no hub source for {purpose}; set {purpose}.download: false "
            f"and {purpose}.path to a local file"
        )
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"downloading '{name}' needs the datasets package, which is not installed; "
            f"run `pip install datasets` or set {purpose}.download: false with a local {purpose}.path"
        ) from None
    args, kwargs, field = source
    try:
        rows = datasets.load_dataset(*args, **kwargs)[field]
    except Exception as e:  # noqa: BLE001 - hub, network, cache and auth failures share no base class
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(
            f"cannot download '{name}' ({args[0]}) from the Hugging Face hub "
            f"({type(e).__name__}: {detail}); the hub is unreachable or refused the request: "
            f"set {purpose}.download: false and {purpose}.path to a local copy"
        ) from None
    docs = [str(r) for r in rows]
    if not docs:
        raise DataError(f"'{name}' from the hub has no documents; set {purpose}.path to a local file")
    return docs


def load_named_documents(
    name: str,
    purpose: str,
    path: str | Path | None = None,
    download: bool = False,
    text_key: str = "text",
) -> list[str]:
    """Load the documents of data set `name` for `purpose`.

    `download` fetches from the hub; otherwise `path` is read, else the bundled copy.
    """
    _check_purpose(purpose)
    _check_name(name)
    if download:
        if name == "custom":
            raise DataError(
                f"'custom' data cannot be downloaded; set {purpose}.download: false "
                f"and {purpose}.path to your file"
            )
        return download_documents(name, purpose)
    if path is not None:
        return read_documents(path, text_key, config_key=f"{purpose}.path")
    if name == "custom":
        raise DataError(f"'custom' data needs a file; set {purpose}.path to a local file or folder")
    return read_documents(bundled_path(name, purpose), text_key, config_key=f"{purpose}.path")
