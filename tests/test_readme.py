"""The README's config reference is the one generated from the schema."""

from pathlib import Path

from llmc.config.reference import readme_block


def test_readme_config_reference_in_sync():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert readme_block() in readme, "README config reference is stale: run python -m llmc.config.reference --write"
