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


def _read_yaml(source: str | Path) -> Any:
    path = Path(source)
    text: str
    is_file = isinstance(source, Path) or (
        "\n" not in source and (source.endswith((".yml", ".yaml")) or _is_file(path))
    )
    if is_file:
        if not _is_file(path):
            raise ConfigError(f"config file {path} not found; pass the path of an existing YAML file")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path} ({exc}); pass a readable UTF-8 YAML file") from None
        where = str(path)
    else:
        text, where = str(source), "<string>"
    try:
        return yaml.safe_load(text)
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
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
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
