"""`compress(config)`: load, evaluate, calibrate and quantize block by block, evaluate, save.

Every check that can fail on user input runs before the model is loaded or any output
is written; outputs appear only complete (see `llmc.save`).
"""

from __future__ import annotations

import logging
import platform
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from llmc.config.loader import load_config
from llmc.config.schema import LlmcConfig
from llmc.data import build_calibration, load_eval_text, load_named_documents, tokenize_windows
from llmc.errors import ConfigError, ModelError
from llmc.eval.perplexity import PROTOCOL, PplResult, evaluate_perplexity
from llmc.export import requested_exporters
from llmc.methods import QuantMethod, get_methods
from llmc.models import LoadedModel, ModelAdapter, load_model
from llmc.models.loader import check_model_paths
from llmc.pipeline import BlockContext, BlockwisePipeline, capture_block_inputs
from llmc.pipeline.planner import check_fits, plan_memory
from llmc.quant import quant_disabled
from llmc.save import FAKE_DIR, TRANS_DIR, atomic_output_dir, check_output_path, save_hf_model, write_json

log = logging.getLogger("llmc")


@dataclass
class RunResult:
    config: LlmcConfig
    model: nn.Module
    tokenizer: object
    adapter: ModelAdapter
    perplexity: list[PplResult] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    save_path: Path | None = None

    def ppl(self, position: str, dataset: str | None = None) -> float:
        for r in self.perplexity:
            if r.position == position and (dataset is None or r.dataset == dataset):
                return r.ppl
        raise KeyError(f"no perplexity measured at {position!r}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"base.device is {name!r} but CUDA is not available; set base.device: cpu (or auto)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"base.device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def compress(
    config: LlmcConfig | str | Path | dict, overrides: list[str] | tuple[str, ...] = (), progress: bool = True
) -> RunResult:
    """Run everything the config asks for; returns the model and the measured numbers."""
    cfg = config if isinstance(config, LlmcConfig) else load_config(config, overrides)
    seed_everything(cfg.base.seed)
    device = resolve_device(cfg.base.device)
    methods = get_methods(cfg.quant) if cfg.quant is not None else []
    out_path = check_output_path(cfg.save.save_path, cfg.save.overwrite)
    exporters = requested_exporters(cfg)
    for exporter in exporters:
        exporter.check(cfg)
    check_model_paths(cfg.model)
    timings: dict[str, float] = {}

    calib_docs = None
    needs_data = [m.name for m in methods if m.uses_calibration]
    if needs_data:
        if cfg.calib is None:
            raise ConfigError(f"method {needs_data[0]} needs calibration data; add a calib section")
        c = cfg.calib
        calib_docs = load_named_documents(c.name, "calib", c.path, c.download, c.text_key)
    eval_texts = {}
    if cfg.eval is not None:
        for name in cfg.eval.names:
            eval_texts[name] = load_eval_text(name, cfg.eval.path, cfg.eval.download)

    start = time.perf_counter()
    loaded = load_model(cfg.model)
    timings["load_s"] = time.perf_counter() - start
    if methods:
        check_group_size(cfg, loaded)
    check_seq_len(cfg, loaded, calib_docs is not None)
    windows = {
        name: tokenize_windows(text, loaded.tokenizer, cfg.eval.seq_len, cfg.eval.max_windows)
        for name, text in eval_texts.items()
    }
    result = RunResult(cfg, loaded.model, loaded.tokenizer, loaded.adapter, timings=timings, save_path=out_path)

    def evaluate(position: str) -> None:
        if cfg.eval is None or position not in cfg.eval.eval_pos:
            return
        for name, win in windows.items():
            r = evaluate_perplexity(
                loaded.model, loaded.adapter, win, device, cfg.eval.bs, cfg.eval.inference_per_block,
                dataset=name, position=position, progress=progress,
            )
            log.info("ppl %s [%s] = %.4f (%d windows x %d tokens)", name, position, r.ppl, r.windows, r.seq_len)
            result.perplexity.append(r)

    evaluate("pretrain")
    if methods:
        start = time.perf_counter()
        quantize_model(cfg, loaded, methods, device, calib_docs, progress)
        timings["quantize_s"] = time.perf_counter() - start
        with quant_disabled(loaded.model):
            evaluate("transformed")
        evaluate("fake_quant")
    print_table(result)
    if out_path is not None:
        write_outputs(result, out_path, device)
    return result


def quantize_model(
    cfg: LlmcConfig, loaded: LoadedModel, methods: list[QuantMethod], device: torch.device,
    calib_docs: list[str] | None, progress: bool,
) -> BlockwisePipeline:
    batches = None
    if calib_docs is not None:
        c = cfg.calib
        batches = build_calibration(calib_docs, loaded.tokenizer, c.n_samples, c.seq_len, c.bs, c.preproc,
                                    cfg.calib_seed)
    return quantize_batches(cfg, loaded.model, loaded.adapter, methods, device, batches, progress)


def quantize_batches(
    cfg: LlmcConfig, model: nn.Module, adapter: ModelAdapter, methods: list[QuantMethod], device: torch.device,
    batches: list[dict] | None, progress: bool = True,
) -> BlockwisePipeline:
    """Plan memory, capture the first block's inputs for `batches` (token ids), then run the block loop."""
    inputs = None
    ids = [b["input_ids"] for b in batches or []]
    n_samples = sum(t.shape[0] for t in ids)
    batch_size, seq_len = ids[0].shape if ids else (0, 0)
    plan = plan_memory(
        model, adapter.get_blocks(model), n_samples, seq_len, batch_size, device,
        method_bytes=max(m.extra_device_bytes(model, adapter, n_samples * seq_len) for m in methods),
        cache_policy=cfg.base.act_cache,
    )
    log.info(plan.describe())
    check_fits(plan, device)
    if batches is not None:
        store = device if plan.cache_on_device else torch.device("cpu")
        inputs = capture_block_inputs(model, adapter, batches, device, store_device=store)
        log.info("captured block inputs: %d batches, %d tokens", len(inputs), inputs.num_tokens())
    pipeline = BlockwisePipeline(model, adapter, device, quant_out=resolve_quant_out(cfg, methods), progress=progress,
                                 desc="+".join(m.name for m in methods))
    pipeline.plan = plan

    def process(ctx: BlockContext) -> None:
        for method in methods:
            method.process_block(ctx)

    # Only the first method sees the block as it came; the others see it transformed.
    blocks = adapter.get_blocks(model)
    pipeline.run(inputs, process, targets=lambda i: quant_targets(cfg, adapter, blocks[i], i), observe=methods[0].observe)
    seconds = pipeline.block_seconds
    log.info("quantized %d blocks in %.1f s (%.2f s per block)", len(seconds), sum(seconds),
             sum(seconds) / max(1, len(seconds)))
    return pipeline


def resolve_quant_out(cfg: LlmcConfig, methods: list[QuantMethod]) -> bool:
    """`quant.quant_out` as given, else true when one of the methods asks for it (GPTQ)."""
    if cfg.quant.quant_out is not None:
        return cfg.quant.quant_out
    return any(m.prefers_quant_out for m in methods)


def quant_targets(cfg: LlmcConfig, adapter: ModelAdapter, block: nn.Module, index: int) -> list[str]:
    """The block's declared linears (`#` expanded) less the ignored ones and float-on-purpose ones."""
    ignored = cfg.quant.ignored_layers
    if index in ignored.blocks():
        return []
    prefix = f"{adapter.blocks}.{index}."
    floats = set(adapter.block_float_linears(block))
    return [
        n for n in adapter.block_linear_names(block)
        if n not in floats and n not in ignored.layer_names and prefix + n not in ignored.speical_names
    ]


def check_group_size(cfg: LlmcConfig, loaded: LoadedModel) -> None:
    w = cfg.quant.weight
    if w.granularity != "per_group" or w.partial_group:
        return
    blocks = loaded.adapter.get_blocks(loaded.model)
    for index in range(len(blocks)):
        for name in quant_targets(cfg, loaded.adapter, blocks[index], index):
            features = blocks[index].get_submodule(name).in_features
            if features % w.group_size:
                divisors = [d for d in (32, 64, 128, 256) if features % d == 0]
                raise ModelError(
                    f"quant.weight.group_size {w.group_size} does not divide the {features} input features of "
                    f"{loaded.adapter.blocks}.{index}.{name}; use a divisor of {features}"
                    + (f" (e.g. {divisors[-1]})" if divisors else "")
                    + ", granularity: per_channel, or quant.weight.partial_group: true (narrower last group)"
                )


def check_seq_len(cfg: LlmcConfig, loaded: LoadedModel, calibrates: bool) -> None:
    limit = getattr(loaded.model.config, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit < 1:
        return
    for key, section in (("calib", cfg.calib if calibrates else None), ("eval", cfg.eval)):
        if section is not None and section.seq_len > limit:
            raise ConfigError(
                f"{key}.seq_len {section.seq_len} exceeds the model's {limit} positions "
                f"(max_position_embeddings); set {key}.seq_len to at most {limit}"
            )


def print_table(result: RunResult) -> None:
    if not result.perplexity:
        return
    print(f"\n{'position':<12} {'dataset':<10} {'windows':>8} {'seq_len':>8} {'ppl':>10}")
    for r in result.perplexity:
        print(f"{r.position:<12} {r.dataset:<10} {r.windows:>8} {r.seq_len:>8} {r.ppl:>10.4f}")
    print(f"protocol: {PROTOCOL}\n")


def results_dict(result: RunResult, device: torch.device) -> dict:
    import transformers

    from llmc import __version__

    return {
        "llmc_version": __version__,
        "perplexity": [r.as_dict() for r in result.perplexity],
        "protocol": PROTOCOL,
        "seed": result.config.base.seed,
        "calib_seed": result.config.calib_seed if result.config.calib else None,
        "timings_s": result.timings,
        "environment": {
            "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "config": result.config.model_dump(mode="json"),
    }


def write_outputs(result: RunResult, out_path: Path, device: torch.device) -> None:
    save = result.config.save
    with atomic_output_dir(out_path, save.overwrite) as tmp:
        write_json(tmp / "results.json", results_dict(result, device))
        if save.save_trans:
            save_hf_model(result.model, result.tokenizer, tmp / TRANS_DIR, fake=False, adapter=result.adapter)
        if save.save_fake:
            save_hf_model(result.model, result.tokenizer, tmp / FAKE_DIR, fake=True, adapter=result.adapter)
        for exporter in requested_exporters(result.config):
            folder = tmp / exporter.folder
            folder.mkdir()
            exporter.write(result.model, result.tokenizer, folder, result.config)
            log.info("wrote %s checkpoint to %s", exporter.key, out_path / exporter.folder)
    log.info("results written to %s", out_path / "results.json")
