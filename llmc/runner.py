"""`compress(config)`: load, evaluate, calibrate and quantize block by block, evaluate, save.

Every check that can fail on user input runs before the model is loaded or any output
is written; outputs appear only complete (see `llmc.save`).
"""

from __future__ import annotations

import contextlib
import logging
import platform
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from llmc.config.loader import check_data_paths, load_config
from llmc.config.schema import SAVE_FLAGS, LlmcConfig
from llmc.data import build_calibration, load_eval_text, load_named_documents, tokenize_windows
from llmc.errors import ConfigError
from llmc.eval import downstream as lm_tasks
from llmc.eval.perplexity import PROTOCOL, PplResult, evaluate_perplexity
from llmc.export import requested_exporters
from llmc.faults import kill_point
from llmc.finite import check_model_weights
from llmc.methods.base import QuantMethod
from llmc.methods.lifecycle import CompressionMethod
from llmc.methods.sparse_base import SparseMethod
from llmc.models import LoadedModel, ModelAdapter, load_model
from llmc.models.loader import check_model_paths
from llmc.models.moe import moe_calibration, moe_routing
from llmc.pipeline import BlockwisePipeline, distributed
from llmc.pipeline.checkpoint import RunCheckpoint, checkpoint_folder, config_fingerprint
from llmc.pipeline.stream_output import StreamedOutputs, streamed_outputs
from llmc.pipeline.streaming import block_store, check_stream_config, check_stream_methods
from llmc.quant import quant_disabled
from llmc.save import (
    FAKE_DIR,
    TRANS_DIR,
    atomic_output_dir,
    check_output_path,
    copy_processor_files,
    save_hf_model,
    write_json,
)
from llmc.schedule import build_methods, check_methods, compress_batches

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
    methods: list[dict] = field(default_factory=list)
    """Summaries of the sparse methods (sparsity reached, removed blocks) for results.json."""
    resumed_after_block: int | None = None
    """The last block a resumed run found finished in its checkpoint (-1: only the statistics pass)."""
    method_results: dict = field(default_factory=dict)
    """What methods report at the model-level steps (QuaRot's rotation, the mixed-precision assignment)."""
    downstream: list[lm_tasks.TaskResult] = field(default_factory=list)
    """lm-eval task metrics per eval position (`eval.tasks`)."""
    blocks: list[dict] = field(default_factory=list)
    """Per processed block: seconds, output error, peak memory (`BlockwisePipeline.block_records`)."""

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
    config: LlmcConfig | str | Path | dict, overrides: list[str] | tuple[str, ...] = (), progress: bool = True,
    resume: str = "auto",
) -> RunResult:
    """Run everything the config asks for; returns the model and the measured numbers.

    `resume`: auto (continue from a matching checkpoint beside save_path, see
    `llmc.pipeline.checkpoint`), require (one must exist: `llmc run --resume`) or never.

    Launched by torchrun (WORLD_SIZE > 1), the calibration is data-parallel (`llmc.pipeline.distributed`):
    every process returns the same model; only rank 0 prints and writes outputs."""
    cfg = config if isinstance(config, LlmcConfig) else load_config(config, overrides)
    seed_everything(cfg.base.seed)
    device = resolve_device(cfg.base.device)
    methods = build_methods(cfg)
    world = max(distributed.env_world_size(), distributed.world_size())
    if world > 1:
        check_data_parallel(cfg, methods, world, resume)
    with distributed.process_group(device) as device:
        result = _compress(cfg, methods, device, progress and distributed.is_main(), resume)
        distributed.barrier()  # the other ranks wait for rank 0's outputs
    return result


def check_data_parallel(cfg: LlmcConfig, methods: list[CompressionMethod], world: int, resume: str) -> None:
    """What a data-parallel run cannot do yet, refused with one line before the model loads."""
    distributed.check_methods(methods, world)
    if resume == "require":
        raise ConfigError("--resume: data-parallel runs are not checkpointed yet; resume on one process (without "
                          "torchrun) or drop --resume")
    if cfg.calib is not None and any(m.uses_calibration for m in methods):
        distributed.check_batches(cfg.calib.n_samples, cfg.calib.bs, world)


def _compress(cfg: LlmcConfig, methods: list[CompressionMethod], device: torch.device, progress: bool,
              resume: str) -> RunResult:
    check_export_refusals(cfg, methods)
    if cfg.model.stream:
        check_stream_config(cfg)
        check_stream_methods(methods)
    # rank 0 alone owns the output folder (and recovers killed runs' folders there)
    out_path = (check_output_path(cfg.save.save_path, cfg.save.overwrite, cfg.model.path)
                if distributed.is_main() else None)
    exporters = requested_exporters(cfg)
    for exporter in exporters:
        exporter.check(cfg)
    check_model_paths(cfg.model)
    check_data_paths(cfg)  # calib (even unused) and eval sources, before the model loads
    lm_tasks.check_tasks(cfg.eval)
    checkpoint = run_checkpoint(cfg, out_path, methods, resume) if not distributed.is_distributed() else None
    if distributed.is_distributed() and out_path is not None and cfg.save.checkpoint and methods:
        log.info("no per-block checkpoints: data-parallel runs are not checkpointed yet")
    resume_state = checkpoint.open(resume) if checkpoint is not None else None
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
        check_methods(cfg, methods, loaded.model, loaded.adapter)
    check_seq_len(cfg, loaded, calib_docs is not None)
    windows = {
        name: tokenize_windows(text, loaded.tokenizer, cfg.eval.seq_len, cfg.eval.max_windows)
        for name, text in eval_texts.items()
    }
    result = RunResult(cfg, loaded.model, loaded.tokenizer, loaded.adapter, timings=timings, save_path=out_path,
                       resumed_after_block=resume_state["done"] if resume_state is not None else None)
    streamed = block_store(loaded.model) is not None  # model.stream: blocks read from disk, outputs written per block
    stream_out = streamed_outputs(cfg, loaded.model, out_path)
    if streamed and distributed.is_distributed():  # every rank evaluates from the blocks rank 0 writes
        staged = distributed.gather_objects(str(stream_out.folder) if stream_out is not None else None)[0]
        if stream_out is None and staged is not None:
            stream_out = StreamedOutputs.reader(Path(staged))

    def evaluate(position: str) -> None:
        if cfg.eval is None or position not in cfg.eval.eval_pos:
            return
        if position == "pretrain" and checkpoint is not None and checkpoint.perplexity:
            result.perplexity.extend(PplResult(**r) for r in checkpoint.perplexity)  # measured before the crash
        else:
            for name, win in windows.items():
                def measure(part: torch.Tensor, name: str = name) -> PplResult:
                    with stream_out.evaluating(loaded.model, position) if stream_out else contextlib.nullcontext():
                        return evaluate_perplexity(
                            loaded.model, loaded.adapter, part, device, cfg.eval.bs,
                            cfg.eval.inference_per_block or streamed, dataset=name, position=position,
                            progress=progress,
                        )

                r = distributed.split_perplexity(measure, win, name, position)  # windows split over ranks
                log.info("ppl %s [%s] = %.4f (%d windows x %d tokens)", name, position, r.ppl, r.windows, r.seq_len)
                result.perplexity.append(r)
        if cfg.eval.tasks and distributed.is_main():  # the other ranks wait at their next collective
            result.downstream.extend(
                lm_tasks.evaluate_tasks(loaded.model, loaded.tokenizer, loaded.adapter, device, cfg.eval, position)
            )

    evaluate("pretrain")
    if checkpoint is not None:
        checkpoint.perplexity = [r.as_dict() for r in result.perplexity]
    if methods:
        start = time.perf_counter()
        pipeline = compress_model(cfg, loaded, methods, device, calib_docs, progress, checkpoint, resume_state)
        result.method_results = dict(getattr(pipeline, "results", {}) or {})
        result.blocks = list(getattr(pipeline, "block_records", []))
        if stream_out is not None:
            stream_out.finish(loaded.model, loaded.tokenizer)
            if streamed:
                distributed.barrier()  # data-parallel: rank 0's blocks are all written before anyone reads them
        timings["quantize_s"] = time.perf_counter() - start
        if checkpoint is not None:
            timings["checkpoint_s"] = checkpoint.write_seconds
        result.methods = [m.summary() for m in methods if isinstance(m, SparseMethod)]
        with quant_disabled(loaded.model):
            evaluate("transformed")
        evaluate("fake_quant")
    if distributed.is_main():
        print_table(result)
    if out_path is not None:
        check_model_weights(loaded.model)  # no NaN/Inf weight is ever saved
        write_outputs(result, out_path, device, stream_out)
    if checkpoint is not None:
        checkpoint.remove()
    return result


def check_export_refusals(cfg: LlmcConfig, methods: list[CompressionMethod]) -> None:
    """Refuse, before anything is loaded, outputs a method's result cannot be written as (`export_refusal`)."""
    flags = [f for f in SAVE_FLAGS if getattr(cfg.save, f)]
    packed = [f for f in flags if f not in ("save_trans", "save_fake")]
    if packed and cfg.quant is not None and (cfg.quant.overrides or cfg.quant.auto_scheme is not None):
        raise ConfigError(
            f"quant.overrides / quant.auto_scheme give modules different schemes, and save.{packed[0]} writes one "
            f"scheme per model here; remove save.{packed[0]} (save_fake writes the mixed model's dense weights)"
        )
    for method in methods:
        reason = method.export_refusal(flags) if flags and isinstance(method, QuantMethod) else None
        if reason:
            raise ConfigError(reason)


def run_checkpoint(
    cfg: LlmcConfig, out_path: Path | None, methods: list[CompressionMethod], resume: str
) -> RunCheckpoint | None:
    """The run's resume checkpoint: beside save_path, when there is one and save.checkpoint is on."""
    if cfg.model.stream:  # a checkpoint restores blocks into memory; streamed runs are not checkpointed yet
        if resume == "require":
            raise ConfigError("--resume: model.stream runs are not checkpointed yet; drop --resume or model.stream")
        return None
    if out_path is None or not cfg.save.checkpoint or not methods:
        if resume == "require":
            raise ConfigError("--resume needs save.save_path and save.checkpoint: true (checkpoints live beside "
                              "save_path)")
        return None
    unresumable = [m.name for m in methods if not m.resumable]
    if unresumable:
        if resume == "require":
            raise ConfigError(f"--resume: {unresumable[0]} cannot be resumed from a checkpoint; run without --resume")
        log.info("no per-block checkpoints: %s cannot be resumed from one", unresumable[0])
        return None
    return RunCheckpoint(checkpoint_folder(out_path), config_fingerprint(cfg.model_dump(mode="json")))


def compress_model(
    cfg: LlmcConfig, loaded: LoadedModel, methods: list[CompressionMethod], device: torch.device,
    calib_docs: list[str] | None, progress: bool, checkpoint: RunCheckpoint | None = None,
    resume_state: dict | None = None,
) -> BlockwisePipeline:
    batches = None
    if calib_docs is not None:
        c = cfg.calib
        batches = build_calibration(calib_docs, loaded.tokenizer, c.n_samples, c.seq_len, c.bs, c.preproc,
                                    cfg.calib_seed)
        batches = distributed.shard(batches)  # data-parallel: this rank's contiguous share, built alike everywhere
    with moe_calibration(loaded.model, cfg.calib, batches):  # MoE: every token through every expert, counted
        return compress_batches(cfg, loaded.model, loaded.adapter, methods, device, batches, progress,
                                checkpoint, resume_state)


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
    if result.perplexity:
        print(f"\n{'position':<12} {'dataset':<10} {'windows':>8} {'seq_len':>8} {'ppl':>10}")
        for r in result.perplexity:
            print(f"{r.position:<12} {r.dataset:<10} {r.windows:>8} {r.seq_len:>8} {r.ppl:>10.4f}")
        print(f"protocol: {PROTOCOL}\n")
    if result.downstream:
        print(lm_tasks.format_table(result.downstream) + "\n")


def results_dict(result: RunResult, device: torch.device) -> dict:
    import transformers

    from llmc import __version__

    return {
        "llmc_version": __version__,
        "perplexity": [r.as_dict() for r in result.perplexity],
        "protocol": PROTOCOL,
        "downstream": lm_tasks.downstream_dict(result.downstream, result.config.eval) if result.downstream else None,
        "seed": result.config.base.seed,
        "calib_seed": result.config.calib_seed if result.config.calib else None,
        "timings_s": result.timings,
        "blocks": result.blocks,
        "sparse": result.methods,
        "methods": result.method_results,
        "resumed_after_block": result.resumed_after_block,
        "world_size": distributed.world_size(),
        "moe_routing": moe_routing(result.model),
        "environment": {
            "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "config": result.config.model_dump(mode="json"),
    }


def write_outputs(result: RunResult, out_path: Path, device: torch.device,
                  streamed: StreamedOutputs | None = None) -> None:
    save = result.config.save
    with atomic_output_dir(out_path, save.overwrite, result.config.model.path) as tmp:
        exporters = requested_exporters(result.config)
        if streamed is not None:  # every output was written block by block (llmc.pipeline.stream_output)
            streamed.move_into(tmp)
            save, exporters = save.model_copy(update={"save_trans": False, "save_fake": False}), []
        if save.save_trans:
            save_hf_model(result.model, result.tokenizer, tmp / TRANS_DIR, fake=False, adapter=result.adapter)
        kill_point("save")
        if save.save_fake:
            save_hf_model(result.model, result.tokenizer, tmp / FAKE_DIR, fake=True, adapter=result.adapter)
        for exporter in exporters:
            folder = tmp / exporter.folder
            folder.mkdir()
            exporter.write(result.model, result.tokenizer, folder, result.config)
            copy_processor_files(getattr(result.model, "name_or_path", None), folder)
            log.info("wrote %s checkpoint to %s", exporter.key, out_path / exporter.folder)
        write_json(tmp / "results.json", results_dict(result, device))  # last: marks the folder complete
    log.info("results written to %s", out_path / "results.json")
