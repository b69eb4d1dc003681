"""The schedule of a compression run: every method's lifecycle steps (`llmc.methods.lifecycle`)
around the block-wise pipeline.

Sparse methods come first, then the quantization methods of `quant.method` (only the last of
those quantizes). Per block each method processes the block with its own targets (the
declared linears less the float-on-purpose ones and its section's ignored layers).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from llmc.config.loader import check_ignored_layers
from llmc.config.schema import IgnoredLayers, LlmcConfig
from llmc.errors import ConfigError, ModelError
from llmc.faults import kill_point
from llmc.finite import check_block_weights
from llmc.methods import QuantMethod, get_methods
from llmc.methods.kvcache import kvcache_method
from llmc.methods.lifecycle import CompressionMethod, ModelContext
from llmc.methods.sparse_base import SparseMethod, sparse_method
from llmc.methods.sparsegpt import is_joint_quantized, join_quant
from llmc.models import ModelAdapter
from llmc.pipeline import BlockContext, BlockwisePipeline, capture_block_inputs
from llmc.pipeline.checkpoint import RunCheckpoint, Wrap
from llmc.pipeline.disk_cache import DiskCache, cache_parent
from llmc.pipeline.planner import check_fits, plan_memory
from llmc.pipeline.streaming import block_store
from llmc.quant.schemes import check_overrides, is_float, scheme_for

log = logging.getLogger("llmc")


def build_methods(cfg: LlmcConfig) -> list[CompressionMethod]:
    """The configured methods in the order they run: sparsification, then quantization."""
    methods: list[CompressionMethod] = [sparse_method(cfg.sparse)] if cfg.sparse is not None else []
    if cfg.quant is not None:
        methods.extend(get_methods(cfg.quant))
        kv = kvcache_method(cfg)  # quant.kvcache: after the block is quantized, on its keys and values
        if kv is not None:
            methods.append(kv)
    # SparseGPT's joint mode (sparse.special.joint_quant) quantizes the quant section's targets itself.
    join_quant(methods, lambda ctx: quant_targets(cfg, ctx.adapter, ctx.block, ctx.index))
    final = quantizing_method(methods)
    if final is not None and final.per_module and any(getattr(m, "joint", None) is not None for m in methods):
        raise ConfigError("sparse.special.joint_quant rounds every linear to quant.weight's grid; remove "
                          "quant.overrides / quant.auto_scheme, or drop joint_quant")
    return methods


def method_targets(cfg: LlmcConfig, method: CompressionMethod, adapter: ModelAdapter, block: nn.Module,
                   index: int) -> list[str]:
    if isinstance(method, SparseMethod):
        return block_targets(cfg.sparse.ignored_layers, adapter, block, index)
    names = quant_targets(cfg, adapter, block, index)
    return [n for n in names if not is_joint_quantized(block.get_submodule(n))]  # done by SparseGPT's joint mode


def quant_targets(cfg: LlmcConfig, adapter: ModelAdapter, block: nn.Module, index: int) -> list[str]:
    """The quant section's targets: `block_targets` less the linears an override leaves in float."""
    names = block_targets(cfg.quant.ignored_layers, adapter, block, index)
    return [n for n in names if not is_float(cfg.quant, adapter, block, index, n)]


def block_targets(ignored: IgnoredLayers, adapter: ModelAdapter, block: nn.Module, index: int) -> list[str]:
    """The block's declared linears (`#` expanded) less the ignored and float-on-purpose ones."""
    if index in ignored.blocks():
        return []
    prefix = f"{adapter.blocks}.{index}."
    floats = set(adapter.block_float_linears(block))
    return [
        n for n in adapter.block_linear_names(block)
        if n not in floats and n not in ignored.layer_names and prefix + n not in ignored.speical_names
    ]


def resolve_block_out(cfg: LlmcConfig, methods: list[CompressionMethod]) -> bool:
    """Whether the next block is fed from the processed block's outputs: `quant.quant_out` as given;
    else true when `sparse.sparsity_out` is (by default when the sparse method asks for it: Wanda,
    SparseGPT) or a quantization method asks for it (GPTQ)."""
    if cfg.quant is not None and cfg.quant.quant_out is not None:
        return cfg.quant.quant_out
    if cfg.sparse is not None and cfg.sparse.sparsity_out is not None:
        pruned_out = cfg.sparse.sparsity_out
    else:
        pruned_out = any(isinstance(m, SparseMethod) and m.prefers_sparsity_out for m in methods)
    return pruned_out or any(isinstance(m, QuantMethod) and m.prefers_quant_out for m in methods)


def check_methods(cfg: LlmcConfig, methods: list[CompressionMethod], model: nn.Module, adapter: ModelAdapter) -> None:
    """Checks a method can make from the loaded model's shapes, before any calibration."""
    for method in methods:
        method.check_adapter(adapter)
    check_ignored_layers(cfg, model, adapter)  # ignored_layers names that match nothing in the model
    check_overrides(cfg.quant, model, adapter)  # quant.overrides entries that match nothing
    blocks = adapter.get_blocks(model)
    for method in methods:
        if isinstance(method, SparseMethod):
            widths = [blocks[i].get_submodule(n).in_features for i in range(len(blocks))
                      for n in method_targets(cfg, method, adapter, blocks[i], i)]
            method.check_model(len(blocks), widths)
        elif cfg.quant is not None and method is quantizing_method(methods):
            check_group_size(cfg, model, adapter)


def check_group_size(cfg: LlmcConfig, model: nn.Module, adapter: ModelAdapter) -> None:
    """Each target's own scheme (with `quant.overrides`) has groups that divide its input features."""
    if not cfg.quant.overrides and (cfg.quant.weight.granularity != "per_group" or cfg.quant.weight.partial_group):
        return
    blocks = adapter.get_blocks(model)
    for index in range(len(blocks)):
        for name in quant_targets(cfg, adapter, blocks[index], index):
            w = scheme_for(cfg.quant, adapter, blocks[index], index, name).weight
            if w.granularity != "per_group" or w.partial_group:
                continue
            features = blocks[index].get_submodule(name).in_features
            if features % w.group_size:
                divisors = [d for d in (32, 64, 128, 256) if features % d == 0]
                raise ModelError(
                    f"quant.weight.group_size {w.group_size} does not divide the {features} input features of "
                    f"{adapter.blocks}.{index}.{name}; use a divisor of {features}"
                    + (f" (e.g. {divisors[-1]})" if divisors else "")
                    + ", granularity: per_channel, or quant.weight.partial_group: true (narrower last group)"
                )


def quantizing_method(methods: list[CompressionMethod]) -> QuantMethod | None:
    """The quantization method that leaves the blocks quantized (None: no quantization)."""
    return next((m for m in methods if isinstance(m, QuantMethod) and m.final), None)


def restore_wrap(methods: list[CompressionMethod]) -> Wrap | None:
    """How a resumed run re-creates the fake-quant linears: as the quantizing method does."""
    final = quantizing_method(methods)
    return final.restore_linear if final is not None else None


def compress_batches(
    cfg: LlmcConfig, model: nn.Module, adapter: ModelAdapter, methods: list[CompressionMethod],
    device: torch.device, batches: list[dict] | None, progress: bool = True,
    checkpoint: RunCheckpoint | None = None, resume: dict | None = None,
) -> BlockwisePipeline:
    """Run every method's lifecycle: model-level preparation, memory plan, capture of the block
    inputs for `batches` (token ids), the statistics pass if asked for, the block loop, and the
    model-level finish. With `checkpoint` every finished block is checkpointed; with `resume`
    (a checkpoint's state) the finished blocks are restored and the loop goes on after them."""
    # base.act_cache: disk keeps the activations in a folder made at the first write, removed at the end
    with DiskCache(cache_parent(cfg.base.act_cache_dir, cfg.save.save_path)) as cache:
        return _compress_batches(cfg, model, adapter, methods, device, batches, progress, checkpoint, resume, cache)


def _compress_batches(
    cfg: LlmcConfig, model: nn.Module, adapter: ModelAdapter, methods: list[CompressionMethod],
    device: torch.device, batches: list[dict] | None, progress: bool,
    checkpoint: RunCheckpoint | None, resume: dict | None, cache: DiskCache,
) -> BlockwisePipeline:
    mctx = ModelContext(model, adapter, device=device, seed=cfg.base.seed)
    for method in methods:
        if isinstance(method, QuantMethod):
            method.bind_model(model, adapter)
        method.prepare_model(mctx)
    blocks = adapter.get_blocks(model)
    ids = [b["input_ids"] for b in batches or []]
    n_samples = sum(t.shape[0] for t in ids)
    batch_size, seq_len = ids[0].shape if ids else (0, 0)
    plan = plan_memory(
        model, blocks, n_samples, seq_len, batch_size, device,
        method_bytes=max(m.extra_device_bytes(model, adapter, n_samples * seq_len) for m in methods),
        replay_bytes=max(m.replay_device_bytes(model, adapter, n_samples * seq_len) for m in methods),
        cache_policy=cfg.base.act_cache, measure_process=True,
        save_fake=bool(cfg.save.save_path and cfg.save.save_fake),
        save_trans=bool(cfg.save.save_path and cfg.save.save_trans),
        eval_tokens=cfg.eval.bs * cfg.eval.seq_len if cfg.eval is not None and cfg.eval.eval_pos else 0,
        cache_dir=str(cache.parent),
    )
    log.info(plan.describe())
    check_fits(plan, device)
    inputs = None
    if batches is not None:
        store = device if plan.cache_on_device else torch.device("cpu")
        hidden = cache.generation() if plan.cache_dir is not None else None
        inputs = capture_block_inputs(model, adapter, batches, device, store_device=store, hidden_store=hidden)
        log.info("captured block inputs: %d batches, %d tokens", len(inputs), inputs.num_tokens())

    def targets_of(method: CompressionMethod, index: int) -> list[str]:
        return method_targets(cfg, method, adapter, blocks[index], index)

    pipeline = BlockwisePipeline(model, adapter, device, quant_out=resolve_block_out(cfg, methods), progress=progress,
                                 desc="+".join(m.name for m in methods), record_blocks=True)
    pipeline.plan = plan
    pipeline.overlap_transfers = plan.overlap
    first = 0
    if resume is not None:
        wrap = restore_wrap(methods)
        for method, state in zip(methods, resume["methods"]):  # restored linears need quant.auto_scheme's bits
            if isinstance(method, QuantMethod):
                method.load_checkpoint_state(state)
        inputs = pipeline.replay(inputs, resume["done"], lambda i: checkpoint.restore_block(i, blocks[i], wrap))
        checkpoint.restore_methods(resume, methods)
        first = resume["done"] + 1
    collectors = [m for m in methods if m.wants_statistics_pass]
    if collectors and inputs is not None and resume is None:
        def collect(ctx: BlockContext) -> None:
            for method in collectors:
                ctx.targets = targets_of(method, ctx.index)
                method.collect_block(ctx)

        BlockwisePipeline(model, adapter, device, progress=progress, desc="statistics").run(inputs, collect)
        for method in collectors:
            if isinstance(method, QuantMethod):
                method.solve_auto_scheme()  # quant.auto_scheme: bits per linear, before any block changes
        if checkpoint is not None:
            checkpoint.save_block(-1, None, methods)

    def process(ctx: BlockContext) -> None:
        kill_point(f"block:{ctx.index}")
        check_block_weights(ctx.block, f"{adapter.blocks}.{ctx.index}")  # NaN/Inf weights: refuse, named
        for method in methods:
            ctx.targets = targets_of(method, ctx.index)
            method.prepare_block(ctx)
        for method in methods:
            ctx.targets = targets_of(method, ctx.index)
            ctx.frozen = {}  # only the last method's recordings hold for the block it leaves
            method.process_block(ctx)

    def after(ctx: BlockContext, outputs: list | None) -> None:
        for method in methods:
            method.after_block(ctx, outputs)
        if checkpoint is not None:
            checkpoint.save_block(ctx.index, ctx.block, methods)
        store = block_store(model)
        if store is not None and store.sink is not None:  # a streamed run writes each block as it finishes
            store.sink(ctx.index, ctx.block)

    # Only the first method sees the block as it came; the others see it transformed.
    try:
        pipeline.run(inputs, process, targets=lambda i: targets_of(methods[0], i), observe=methods[0].observe,
                     after=after, first=first, consume=True)
    except BaseException:
        if checkpoint is not None:
            checkpoint.wait(quiet=True)  # a failed or interrupted run keeps every block it finished
        raise
    if checkpoint is not None:
        checkpoint.wait()
    for method in methods:
        method.finish_model(mctx)
    final = quantizing_method(methods)
    if final is not None and final.mixed_precision:
        mctx.results["mixed_precision"] = final.mixed_precision
    pipeline.results = mctx.results  # entries for results.json
    seconds = pipeline.block_seconds
    log.info("processed %d blocks in %.1f s (%.2f s per block)", len(seconds), sum(seconds),
             sum(seconds) / max(1, len(seconds)))
    return pipeline
