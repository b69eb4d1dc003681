"""The reliability table: bad-input and fault cases the test suite tries, per category, and how many are handled.

    python benchmarks/reliability.py               # writes benchmarks/results/reliability.{json,md}
    python benchmarks/reliability.py -- -x         # extra arguments after `--` go to pytest

It runs `pytest -m reliability tests` with this file as a pytest plugin (`-p reliability`) and reads pytest's
JUnit XML report, as benchmarks/models.py does for the conformance test, so the table cannot claim more than
the tests check. The plugin gives every collected test its category and case count as JUnit properties:

* the category is the argument of the test's `@pytest.mark.reliability("category")` marker (any new category
  makes a new row; no list to keep up to date);
* tests of the files in LEGACY that carry no marker get that file's category (their owners mark them later);
* a test id counts one case (each parametrized case is its own id); a Hypothesis test counts its
  `max_examples` plus its explicit `@example`s: the examples it is configured to try (it may try fewer when
  its strategies hold fewer distinct values);
* tried = cases of the tests that ran (passed or failed); handled = cases of the tests that passed: a failing
  Hypothesis test counts all its examples as tried and none as handled. Skipped tests are listed apart.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MARKER = "reliability"
LEGACY = {"tests/test_bad_input.py": "bad input (legacy)"}
"""Test files of bad-input cases written before the marker, counted under a category of their own."""
PROPS = ("reliability_category", "reliability_cases", "reliability_file", "reliability_source")


# ---------------------------------------------------------------- the pytest plugin (`-p reliability`)

def case_count(item: pytest.Item) -> int:
    fn = getattr(item, "obj", None)
    if not getattr(fn, "is_hypothesis_test", False):
        return 1
    from hypothesis import settings

    chosen = getattr(fn, "_hypothesis_internal_use_settings", None) or settings.default
    return chosen.max_examples + len(getattr(fn, "hypothesis_explicit_examples", ()))


@pytest.hookimpl(tryfirst=True)  # before `-m reliability` deselects the unmarked legacy tests
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        try:
            rel = Path(item.path).resolve().relative_to(ROOT).as_posix()
        except ValueError:
            rel = str(item.path)
        marker = item.get_closest_marker(MARKER)
        source = "marker"
        if marker is None:
            if rel not in LEGACY:
                continue
            item.add_marker(getattr(pytest.mark, MARKER)(LEGACY[rel]))
            marker, source = item.get_closest_marker(MARKER), "legacy"
        category = marker.args[0] if marker.args else marker.kwargs.get("category", "uncategorized")
        item.user_properties += [("reliability_category", str(category)), ("reliability_cases", case_count(item)),
                                 ("reliability_file", rel), ("reliability_source", source)]


# ---------------------------------------------------------------- the table

def run_tests(xml: Path, extra: list[str]) -> list[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "reliability", "-m", MARKER,
           "tests", f"--junitxml={xml}", *extra]
    subprocess.run(cmd, cwd=ROOT, env=env, check=False)
    return cmd


def parse(xml: Path) -> list[dict]:
    """One row per test case of the report that carries a reliability category."""
    rows = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        props = {p.get("name"): p.get("value") for p in case.iter("property") if p.get("name") in PROPS}
        if "reliability_category" not in props:
            continue
        outcome = "failed" if case.find("failure") is not None or case.find("error") is not None else (
            "skipped" if case.find("skipped") is not None else "passed")
        rows.append({"id": f"{case.get('classname', '')}::{case.get('name', '')}",
                     "category": props["reliability_category"], "cases": int(props.get("reliability_cases", 1)),
                     "file": props.get("reliability_file", "?"), "source": props.get("reliability_source", "marker"),
                     "outcome": outcome, "seconds": float(case.get("time", 0))})
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    by: dict[str, dict] = defaultdict(lambda: {"tests": 0, "tried": 0, "handled": 0, "skipped": 0, "failed": [],
                                               "files": set(), "seconds": 0.0, "legacy": False})
    for r in rows:
        c = by[r["category"]]
        c["tests"] += 1
        c["files"].add(r["file"])
        c["seconds"] += r["seconds"]
        c["legacy"] |= r["source"] == "legacy"
        if r["outcome"] == "skipped":
            c["skipped"] += 1
            continue
        c["tried"] += r["cases"]
        if r["outcome"] == "passed":
            c["handled"] += r["cases"]
        else:
            c["failed"].append(r["id"])
    return [{"category": k, **v, "files": sorted(v["files"])} for k, v in sorted(by.items())]


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("LLMC_COMMIT")
    return out.stdout.strip() or None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "reliability"))
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import environment

    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "reliability.xml"
        cmd = run_tests(xml, args.pytest_args)
        rows = parse(xml) if xml.exists() else []
    table = summarize(rows)
    env = environment()
    env["commit"] = git_commit()
    env["dirty"] = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                       capture_output=True, text=True).stdout.strip())
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python benchmarks/reliability.py"
    pytest_cmd = " ".join(["pytest", *(a if not a.startswith("--junitxml=") else "--junitxml=TMP/reliability.xml"
                                       for a in cmd[3:])])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(
        {"command": command, "pytest": pytest_cmd, "date": date, "environment": env, "legacy_files": LEGACY,
         "categories": table, "tests": rows}, indent=2) + "\n")
    total = {k: sum(c[k] for c in table) for k in ("tests", "tried", "handled", "skipped")}
    lines = [
        "# Reliability: bad-input and fault cases, per category", "",
        f"- command: `{command}` (runs `{pytest_cmd}` with benchmarks/reliability.py as a plugin, "
        "reads its JUnit report)",
        f"- date: {date}; llmc commit `{env['commit']}`{' (with uncommitted changes)' if env['dirty'] else ''}; "
        f"python {env['python']}, torch {env['torch']}, transformers {env['transformers']}; {env['device']}",
        "- a category is the argument of a test's `@pytest.mark.reliability(...)` marker; "
        + ", ".join(f"unmarked tests of `{f}` count as \"{c}\"" for f, c in LEGACY.items())
        + " (cases written before the marker, so that none are lost)",
        "- cases: one per test id (each parametrized case is one id); a Hypothesis test counts its `max_examples` "
        "plus its explicit examples. Tried: cases of the tests that ran; handled: cases of the tests that passed "
        "(a failing test's cases are all unhandled). Skipped tests are not tried.", "",
        "| category | cases tried | handled | tests | skipped | test files |", "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for c in table:
        lines.append(f"| {c['category']} | {c['tried']} | {c['handled']} | {c['tests']} | {c['skipped']} | "
                     + ", ".join(f"`{f}`" for f in c["files"]) + " |")
    lines.append(f"| **total** | **{total['tried']}** | **{total['handled']}** | **{total['tests']}** | "
                 f"**{total['skipped']}** | |")
    failed = [t for c in table for t in c["failed"]]
    if failed:
        lines += ["", "Not handled (failing tests):", "", *[f"- `{t}`" for t in failed]]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
