"""The config reference in README.md, generated from the schema (`python -m llmc.config.reference`).

A test checks that README.md holds exactly this text, so the documentation cannot drift.
"""

from __future__ import annotations

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from llmc.config.loader import _model_in
from llmc.config.schema import LlmcConfig

BEGIN = "<!-- config-reference:begin -->"
END = "<!-- config-reference:end -->"


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return "(section)"
        return f"`{value}`"
    if field.default is PydanticUndefined:
        return "required"
    return f"`{field.default}`"


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        sub = _model_in(field.annotation)
        key = f"{prefix}{name}"
        if sub is not None:
            doc = field.description or (sub.__doc__ or "").strip()
            rows.append(f"| **`{key}`** | {_default(field) if sub is None else 'section'} | {doc} |")
            rows.extend(_rows(sub, key + "."))
        else:
            rows.append(f"| `{key}` | {_default(field)} | {field.description or ''} |")
    return rows


def reference_markdown() -> str:
    lines = ["| key | default | meaning |", "| --- | --- | --- |", *_rows(LlmcConfig, "")]
    return "\n".join(lines)


def readme_block() -> str:
    return f"{BEGIN}\n{reference_markdown()}\n{END}"


def update_readme(path: str = "README.md") -> None:
    """Replace the README's reference block with the current one (`python -m llmc.config.reference --write`)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    with open(path, "w", encoding="utf-8") as f:
        f.write(head + readme_block() + tail)


if __name__ == "__main__":
    import sys

    if "--write" in sys.argv:
        update_readme()
    else:
        print(readme_block())
