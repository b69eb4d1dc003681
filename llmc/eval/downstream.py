"""Downstream task accuracy with lm-evaluation-harness (the optional `lm-eval` package) on the
in-memory model, at each `eval.eval_pos`, after perplexity.

The model is the one llmc holds at that point (float, transformed, or with its FakeQuantLinear
layers), wrapped with lm-eval's `HFLM(pretrained=model, tokenizer=...)`; with
`eval.inference_per_block` every forward streams the blocks through the device one at a time
(the same path as streamed perplexity), so loglikelihood tasks run on models larger than it.

Offline: piqa, lambada_openai, winogrande, openbookqa and boolq have bundled copies of their
data (llmc/assets/downstream/<task>/, provenance and licenses in each README) with lm-eval's
own prompts (`task.yaml`, the data path filled in here). `eval.tasks_local` picks them: `auto`
(the default) when HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set, `true` always, `false` never
(lm-eval's hub tasks, which need the network or a filled HF cache). Other names go to lm-eval's
task registry.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from llmc.errors import ConfigError
from llmc.models.adapter import ModelAdapter
from llmc.pipeline.offload import on_device

log = logging.getLogger("llmc")

TASKS_DIR = Path(__file__).resolve().parents[1] / "assets" / "downstream"
LOCAL_TASKS = ("piqa", "lambada_openai", "winogrande", "openbookqa", "boolq")
BOOTSTRAP_ITERS = 1000
"""Resamples for the stderr of non-mean metrics (LAMBADA's perplexity); lm-eval's default 100000 takes minutes."""
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


@dataclass
class TaskResult:
    task: str
    position: str
    metric: str
    value: float
    stderr: float | None
    filter: str
    samples: int
    num_fewshot: int | None
    source: str
    """local (llmc's bundled copy) or hub (lm-eval's registry)."""
    config_sha256: str
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in _OFFLINE_VARS)


def use_local(tasks_local: bool | str) -> bool:
    return offline() if tasks_local == "auto" else bool(tasks_local)


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def _require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ConfigError(
            "eval.tasks needs lm-evaluation-harness, which is not installed; pip install 'llmc[eval]' "
            "(or remove eval.tasks)"
        ) from None


@functools.lru_cache(maxsize=2)
def _task_manager(hub: bool = True):
    """lm-eval's registry; without hub tasks an empty one (indexing the registry takes seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=hub)


def check_tasks(eval_section) -> None:
    """Before the model loads: lm-eval is installed and every task name exists where it will be read."""
    if eval_section is None or not eval_section.tasks:
        return
    _require_lm_eval()
    local = use_local(eval_section.tasks_local)
    remote = [t for t in eval_section.tasks if not (local and t in LOCAL_TASKS)]
    if not remote:
        return
    if offline() and eval_section.tasks_local is not False:  # tasks_local: false offline: lm-eval's HF cache
        raise ConfigError(
            f"eval.tasks: {remote[0]!r} has no offline copy (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set); "
            f"use {', '.join(LOCAL_TASKS)}, or unset the offline variables to use lm-eval's hub tasks"
        )
    known = set(_task_manager().all_tasks)
    for name in remote:
        if name not in known:
            raise ConfigError(f"eval.tasks: {name!r} is not an lm-eval task; see `lm_eval ls tasks` for the names")


def local_task_config(name: str) -> dict:
    """The bundled task's lm-eval config with its data files made absolute."""
    folder = TASKS_DIR / name
    cfg = yaml.safe_load((folder / "task.yaml").read_text())
    files = cfg["dataset_kwargs"]["data_files"]
    cfg["dataset_kwargs"]["data_files"] = {split: str(folder / f) for split, f in files.items()}
    return cfg


def task_specs(names: list[str], local: bool) -> list[str | dict]:
    """What lm-eval's `simple_evaluate(tasks=...)` gets for llmc's task names."""
    return [local_task_config(n) if local and n in LOCAL_TASKS else n for n in names]


def config_sha256(task_config: dict) -> str:
    """sha256 of the task config lm-eval ran (bundled data paths made machine-independent)."""
    text = json.dumps(task_config, sort_keys=True, default=str).replace(str(TASKS_DIR), "<llmc>/assets/downstream")
    return hashlib.sha256(text.encode()).hexdigest()


def _number(value) -> float | None:
    return float(value) if isinstance(value, int | float) else None  # lm-eval writes "N/A" for no stderr


def parse_results(out: dict, position: str, sources: dict[str, str], seconds: float) -> list[TaskResult]:
    rows = []
    for task, metrics in out["results"].items():
        cfg = out.get("configs", {}).get(task)
        sha = config_sha256(cfg) if cfg is not None else ""
        n = out.get("n-samples", {}).get(task, {}).get("effective", 0)
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key:
                continue
            metric, filt = key.split(",", 1)
            if _number(value) is None:
                continue
            rows.append(TaskResult(
                task=task, position=position, metric=metric, value=float(value),
                stderr=_number(metrics.get(f"{metric}_stderr,{filt}")), filter=filt, samples=int(n),
                num_fewshot=out.get("n-shot", {}).get(task), source=sources.get(task, "hub"), config_sha256=sha,
                seconds=seconds,
            ))
    return rows


@contextlib.contextmanager
def _quiet_hflm():
    """HFLM warns that an in-memory model ignores its loading arguments: that is what llmc means to do."""
    logger = logging.getLogger("lm_eval.models.huggingface")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _streamed_lm(model: nn.Module, tokenizer, adapter: ModelAdapter, device: torch.device, bs: int):
    """HFLM whose forward streams the blocks through `device` (eval.inference_per_block)."""
    from lm_eval.models.huggingface import HFLM

    from llmc.eval.perplexity import apply_head, stream_hidden_states

    class StreamedHFLM(HFLM):
        def _model_call(self, inps, attn_mask=None, labels=None):
            hidden = stream_hidden_states(model, adapter, [inps.cpu()], device)[0]
            return apply_head(model, adapter, hidden.to(device), device)

        def _model_generate(self, *args, **kwargs):
            raise ConfigError("eval.inference_per_block scores loglikelihood tasks only; this task generates text, "
                              "so set eval.inference_per_block: false for it")

    with _quiet_hflm():
        lm = StreamedHFLM(pretrained=model, tokenizer=tokenizer, batch_size=bs)
    lm._device = device  # inputs go to the device the streamed blocks run on
    return lm


@torch.no_grad()
def evaluate_tasks(
    model: nn.Module, tokenizer, adapter: ModelAdapter, device: torch.device, eval_section, position: str
) -> list[TaskResult]:
    """Run eval.tasks on the model as it is now; one row per task (or group) and metric."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    e = eval_section
    local = use_local(e.tasks_local)
    specs = task_specs(e.tasks, local)
    sources = {n: ("local" if isinstance(s, dict) else "hub") for n, s in zip(e.tasks, specs)}
    hub = any(isinstance(s, str) for s in specs)
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        if e.inference_per_block:
            out = _simple_evaluate(lm_eval, _streamed_lm(model, tokenizer, adapter, device, e.tasks_bs), specs, e, hub)
        else:
            with on_device(model, device):
                with _quiet_hflm():
                    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=e.tasks_bs)
                out = _simple_evaluate(lm_eval, lm, specs, e, hub)
    finally:
        model.train(was_training)
    rows = parse_results(out, position, sources, time.perf_counter() - start)
    for r in rows:
        log.info("%s %s [%s] = %.4f", r.task, r.metric, position, r.value)
    return rows


def _simple_evaluate(lm_eval, lm, specs: list, e, hub: bool) -> dict:
    # lm-eval seeds python, numpy and torch; the run's own random streams continue unchanged afterwards.
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        return lm_eval.simple_evaluate(
            model=lm, tasks=specs, num_fewshot=e.num_fewshot, limit=e.limit, bootstrap_iters=BOOTSTRAP_ITERS,
            log_samples=False, task_manager=_task_manager(hub),
        )
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def downstream_dict(rows: list[TaskResult], eval_section) -> dict:
    """results.json's `downstream` entry."""
    return {
        "harness": "lm-evaluation-harness",
        "lm_eval_version": lm_eval_version(),
        "num_fewshot": eval_section.num_fewshot,
        "limit": eval_section.limit,
        "batch_size": eval_section.tasks_bs,
        "bootstrap_iters": BOOTSTRAP_ITERS,
        "task_configs_sha256": {r.task: r.config_sha256 for r in rows},
        "results": [r.as_dict() for r in rows],
    }


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if abs(v) < 1e5 else f"{v:.3e}"


def format_table(rows: list[TaskResult]) -> str:
    lines = [f"{'position':<12} {'task':<16} {'metric':<12} {'n':>6} {'value':>10} {'stderr':>10}"]
    for r in rows:
        lines.append(
            f"{r.position:<12} {r.task:<16} {r.metric:<12} {r.samples:>6} {_fmt(r.value):>10} {_fmt(r.stderr):>10}"
        )
    return "\n".join(lines)
