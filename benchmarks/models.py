"""The supported model families, as checked by the conformance test: one row per tiny model of
tests/zoo, with each check's outcome and time, the adapter and its declaration's size.

    python benchmarks/models.py            # runs tests/test_families.py, writes benchmarks/results/models.{json,md}
    python benchmarks/models.py --readme   # also prints the README's family table

The checks are the conformance test's own (tests/test_families.py), read back from pytest's
JUnit XML report, so this table cannot claim more than the test suite checks.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
CHECKS = {
    "test_adapter_covers_the_model_and_block_loop_matches": "coverage + block loop",
    "test_scale_folding_keeps_the_function[AWQ]": "AWQ folding",
    "test_scale_folding_keeps_the_function[SmoothQuant]": "SmoothQuant folding",
    "test_rtn_runs": "RTN",
    "test_gptq_saves_fake_and_compressed_tensors": "GPTQ, save_fake + compressed-tensors reload",
}


def run_tests(xml: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_families.py"),
           f"--junitxml={xml}"]
    subprocess.run(cmd, cwd=ROOT, env=env, check=False)


def parse(xml: Path) -> dict[str, dict[str, dict]]:
    """Per family id, per check: outcome and seconds."""
    out: dict[str, dict[str, dict]] = defaultdict(dict)
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = case.get("name", "")
        if "[" not in name:
            continue
        test, params = name.split("[", 1)
        params = params.rstrip("]")
        method, _, rest = params.partition("-")
        family, key = (rest, f"{test}[{method}]") if method in ("AWQ", "SmoothQuant") else (params, test)
        if key not in CHECKS:
            continue
        outcome = "failed" if case.find("failure") is not None or case.find("error") is not None else (
            "skipped" if case.find("skipped") is not None else "passed")
        out[family][CHECKS[key]] = {"outcome": outcome, "seconds": float(case.get("time", 0))}
    return out


def adapter_lines() -> dict[str, tuple[str, int]]:
    """Adapter name -> (its module, lines of that module)."""
    from llmc.models import ADAPTERS, families

    found = {}
    for module_path in Path(families.__file__).parent.glob("*.py"):
        module_name = f"llmc.models.families.{module_path.stem}"
        module = sys.modules.get(module_name)
        if module is None:
            continue
        for value in vars(module).values():
            if any(value is a for a in ADAPTERS.values()):
                found[value.name] = (module_path.name, len(inspect.getsource(module).splitlines()))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "models"))
    parser.add_argument("--readme", action="store_true")
    args = parser.parse_args()
    import torch
    import transformers
    from zoo import all_models

    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "families.xml"
        run_tests(xml)
        results = parse(xml)
    modules = adapter_lines()
    rows = []
    for spec in all_models():
        module, lines = modules.get(spec.adapter, ("?", 0))
        checks = results.get(spec.id, {})
        rows.append({"id": spec.id, "model_type": spec.config(384).model_type, "adapter": spec.adapter,
                     "module": module, "module_lines": lines, "checks": checks,
                     "seconds": sum(c["seconds"] for c in checks.values())})
    env = {"device": f"cpu ({platform.machine()})", "torch": torch.__version__,
           "transformers": transformers.__version__, "python": platform.python_version()}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    header = ["tiny model", "model_type", "adapter (module, lines)", *CHECKS.values(), "total (s)"]
    lines = ["# Model families: the conformance test per family", "",
             f"- environment: {env}",
             "- command: `python benchmarks/models.py` (runs `pytest tests/test_families.py`, reads its JUnit report)",
             "- each tiny model: 2 layers, hidden 64, random weights, built from its transformers config class "
             "(tests/zoo/); calibration 2 x 32 tokens; every cell is the check's outcome and its time in seconds", "",
             "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in rows:
        cells = [f"{r['checks'][c]['outcome']} ({r['checks'][c]['seconds']:.1f})" if c in r["checks"] else "not run"
                 for c in CHECKS.values()]
        lines.append(f"| {r['id']} | `{r['model_type']}` | {r['adapter']} ({r['module']}, {r['module_lines']}) | "
                     + " | ".join(cells) + f" | {r['seconds']:.1f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.readme:
        print(readme_table(rows))


def readme_table(rows: list[dict]) -> str:
    by_adapter: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_adapter[r["adapter"]].append(r)
    lines = ["| adapter (`model.type`) | transformers `model_type` | declaration | conformance checks passed |",
             "| --- | --- | --- | --- |"]
    for adapter, group in sorted(by_adapter.items()):
        types = ", ".join(sorted({f"`{r['model_type']}`" for r in group}))
        passed = sum(c["outcome"] == "passed" for r in group for c in r["checks"].values())
        total = sum(len(r["checks"]) for r in group)
        layouts = f" ({len(group)} layouts)" if len(group) > 1 else ""
        lines.append(f"| {adapter} | {types} | {group[0]['module']}, {group[0]['module_lines']} lines | "
                     f"{passed}/{total}{layouts} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
