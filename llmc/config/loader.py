"""Load a YAML config into `LlmcConfig`, apply `--set` overrides, explain errors in one line."""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from llmc.config.schema import LlmcConfig
from llmc.errors import ConfigError


def load_config(source: str | Path | dict, overrides: list[str] | tuple[str, ...] = ()) -> LlmcConfig:
    """Read a config from a YAML file path, a YAML string or a dict; apply `key.path=value` overrides."""
    if isinstance(source, dict):
        raw: Any = copy.deepcopy(source) if overrides else source
    else:
        raw = _read_yaml(source)
    if raw is None:
        raise ConfigError("the config is empty; it needs at least a `model:` section with `path:`")
    if not isinstance(raw, dict):
        raise ConfigError(
            f"the config must be a mapping of sections (base, model, calib, eval, quant, save), "
            f"not a {type(raw).__name__}"
        )
    for item in overrides:
        _apply_override(raw, item)
    try:
        return LlmcConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(explain_validation_error(exc)) from None


class DuplicateKeyError(yaml.YAMLError):
    """A mapping holds the same key twice (PyYAML would silently keep the last one)."""

    def __init__(self, key: Any, line: int, first_line: int) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key, self.line, self.first_line = key, line, first_line


class StrictLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a key repeated in one mapping, at any level (merge keys
    `<<:` still let a mapping's own keys override the merged ones)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise DuplicateKeyError(key, line, seen[key])
                    seen[key] = line
                except TypeError:  # an unhashable key is refused later by the constructor
                    continue
        return super().construct_mapping(node, deep=deep)


def yaml_load(text: str) -> Any:
    """Parse YAML safely, refusing duplicate keys (`DuplicateKeyError`)."""
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - StrictLoader is a SafeLoader


def _read_yaml(source: str | Path) -> Any:
    path = Path(source)
    text: str
    if isinstance(source, str) and "\n" not in source and _is_dir(path):
        raise ConfigError(f"config path {source} is a folder, not a file; pass the path of a YAML file")
    is_file = isinstance(source, Path) or (
        "\n" not in source and (source.endswith((".yml", ".yaml")) or _is_file(path) or _looks_like_path(source))
    )
    if is_file:
        if _is_dir(path):
            raise ConfigError(f"config path {path} is a folder, not a file; pass the path of a YAML file")
        if not _is_file(path):
            raise ConfigError(
                f"config file {path} not found (it does not exist); pass the path of an existing YAML file"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path} ({exc}); pass a readable UTF-8 YAML file") from None
        where = str(path)
    else:
        text, where = str(source), "<string>"
    try:
        return yaml_load(text)
    except DuplicateKeyError as exc:
        raise ConfigError(
            f"duplicate key {exc.key!r} at line {exc.line} of {where} (first at line {exc.first_line}); "
            f"YAML would silently keep only the last one: remove or merge one of them"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        pos = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(
            f"malformed YAML in {where}{pos}: {problem}; fix the indentation or quoting there"
        ) from None
    except (ValueError, TypeError, AttributeError, RecursionError) as exc:
        # PyYAML's constructors raise these for bad tagged or date-like values (`!!int abc`,
        # `2001-13-01`), its composer RecursionError for absurdly deep nesting.
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ConfigError(
            f"malformed YAML in {where}: {detail}; quote the value (or remove the !! tag) there"
        ) from None


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # e.g. a one-line YAML string longer than NAME_MAX
        return False


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except (OSError, ValueError):
        return False


def _looks_like_path(source: str) -> bool:
    """A one-line string that cannot be a config mapping but looks like a file name (`run.conf`,
    `configs/x`): `llmc run missing.conf` then says the file does not exist."""
    text = source.strip()
    if not text or any(c in text for c in ":{}[]#\n") or " " in text:
        return False
    try:
        float(text)
        return False
    except ValueError:
        return "." in text.lstrip("./") or "/" in text or text.startswith("~")


def _apply_override(raw: dict, item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r} is not of the form dotted.key=value, e.g. --set quant.weight.bit=3")
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a section; check the key path")
        node = child
    try:
        node[parts[-1]] = yaml_load(value) if value.strip() else None
    except (yaml.YAMLError, ValueError, TypeError, AttributeError, RecursionError):
        node[parts[-1]] = value


def explain_validation_error(exc: ValidationError, root: type[BaseModel] = LlmcConfig, prefix: str = "") -> str:
    """The first error as `section.key: problem; fix`, with a did-you-mean for unknown keys."""
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    dotted = prefix + ".".join(loc) or "config"
    etype = err["type"]
    if etype == "extra_forbidden":
        valid = _valid_keys(root, loc[:-1])
        close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}?" if close else f"valid keys here: {', '.join(sorted(valid))}"
        msg = f"unknown key {dotted!r}; {hint}"
    elif etype == "missing":
        msg = f"missing required key {dotted!r}; add it to the config"
    elif etype == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        msg = f"{dotted}: {err['input']!r} is not allowed; use one of {expected}"
    elif etype in ("value_error", "assertion_error"):
        text = str(err.get("ctx", {}).get("error", err["msg"]))
        msg = f"{dotted}: {text}" if loc else text
    else:
        msg = f"{dotted}: {err['msg']} (got {err.get('input')!r}); fix this value in the config"
    more = len(exc.errors()) - 1
    return msg + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")


def _valid_keys(model: type[BaseModel], path: list[str]) -> list[str]:
    """Field names of the section reached by `path` from the root model."""
    current: Any = model
    for part in path:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            break
        current = _model_in(field.annotation)
    return list(getattr(current, "model_fields", {}).keys())


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def check_data_paths(cfg: LlmcConfig) -> None:
    """The calib and eval data sources exist and are of the right kind, before the model loads;
    the calib section is checked even when no method calibrates (a broken section is an error)."""
    from llmc.data.sources import SUPPORTED_SUFFIXES, bundled_path
    from llmc.errors import DataError

    sections = [("calib", cfg.calib, [cfg.calib.name] if cfg.calib else [])]
    sections.append(("eval", cfg.eval, cfg.eval.names if cfg.eval else []))
    for key, section, names in sections:
        if section is None:
            continue
        for name in names:
            if section.download and name == "custom":
                raise DataError(f"'custom' data cannot be downloaded; set {key}.download: false and {key}.path "
                                f"to your file")
            if not section.download and section.path is None:
                if name == "custom":
                    raise DataError(f"'custom' data needs a file; set {key}.path to a local file or folder")
                bundled_path(name, key)  # DataError when llmc bundles no copy of `name`
        if section.download or section.path is None:
            continue
        path = Path(section.path).expanduser()
        if not path.exists():
            raise DataError(
                f"{key}.path {section.path} not found (it does not exist); set {key}.path to an existing "
                f".txt/.json/.jsonl(.gz)/.parquet file or a folder of them"
            )
        if path.is_dir():
            files = [p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(SUPPORTED_SUFFIXES)]
            wikitext = key == "eval" and "wikitext2" in names and (path / "wiki.test.raw").is_file()
            if not files and not wikitext:
                raise DataError(
                    f"{key}.path {section.path} is a folder with no data files; point {key}.path at a file, or add "
                    f"files ending in {', '.join(SUPPORTED_SUFFIXES)}"
                )
        elif not path.is_file():
            raise DataError(f"{key}.path {section.path} is not a regular file; set {key}.path to a data file")


def check_ignored_layers(cfg: LlmcConfig, model: Any, adapter: Any) -> None:
    """Every name and block index in `quant`/`sparse` `ignored_layers` matches something in the
    loaded model (right after load, before calibration); a typo would silently quantize the layer."""
    blocks = adapter.get_blocks(model)
    n_blocks = len(blocks)
    relative = sorted({n for block in blocks for n in adapter.block_linear_names(block)})
    full = [f"{adapter.blocks}.{i}.{n}" for i, block in enumerate(blocks) for n in adapter.block_linear_names(block)]
    full_set = set(full)
    for key in ("sparse", "quant"):
        section = getattr(cfg, key)
        if section is None:
            continue
        ignored = section.ignored_layers
        where = f"{key}.ignored_layers"
        for entry in ignored.block_ids:
            lo, _, hi = str(entry).strip().partition("-")
            if max(int(lo), int(hi or lo)) >= n_blocks:
                raise ConfigError(
                    f"{where}.block_ids: {entry!r} is beyond the model's {n_blocks} blocks; use block indices "
                    f"0..{n_blocks - 1}"
                )
        for name in ignored.layer_names:
            if name not in relative:
                hint = (f"it is a full module name: move it to {where}.speical_names" if name in full_set
                        else _did_you_mean(name, relative))
                raise ConfigError(
                    f"{where}.layer_names: {name!r} matches no linear in the model's blocks; {hint}"
                )
        for name in ignored.speical_names:
            if name not in full_set:
                hint = (f"it is a name inside a block: move it to {where}.layer_names" if name in relative
                        else _did_you_mean(name, full))
                raise ConfigError(f"{where}.speical_names: {name!r} matches no linear in the model; {hint}")


def _did_you_mean(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]!r}?"
    shown = ", ".join(valid[:8]) + (", ..." if len(valid) > 8 else "")
    return f"valid names: {shown}"
