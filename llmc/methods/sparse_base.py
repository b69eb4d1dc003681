"""The sparsification methods' base class and registry, and the pruning patterns they share.

A sparse method scores each weight of a block's linears (lower = pruned first) and zeroes the
lowest scores in a pattern: unstructured (the same fraction of every output row) or N:M (N zeros
in every M consecutive inputs of a row, what sparse tensor cores run). Per-block sparsity comes
from `sparse.weight.sparsity`, a list (`layer_sparsity`) or OWL's outlier-weighted rule.
Pruned linears are marked so that a following quantization keeps their zeros.

Config (`sparse:`): method, weight.{sparsity, pattern, layer_sparsity, owl_lambda, owl_m,
n_prune_layers}, sparsity_out, special (method keys), ignored_layers.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import ClassVar

import torch
from pydantic import BaseModel, ValidationError
from torch import Tensor, nn

from llmc.config.loader import explain_validation_error
from llmc.config.schema import SparseSection
from llmc.errors import ConfigError, ModelError
from llmc.methods.base import NoSpecial
from llmc.methods.lifecycle import CompressionMethod
from llmc.pipeline.blockwise import BlockContext
from llmc.quant.fake_linear import PRUNED  # the pruned mark; FakeQuantLinear carries it

SPARSE_METHODS: dict[str, type[SparseMethod]] = {}


def prune_mask(scores: Tensor, sparsity: float, n_m: tuple[int, int] | None) -> Tensor:
    """Bool mask `[out, in]` of the weights to prune: the lowest `scores` of each row
    (`int(sparsity * in)` of them), or the N lowest of every M consecutive inputs."""
    rows, cols = scores.shape
    if n_m is not None:
        n, m = n_m
        groups = scores.reshape(rows, cols // m, m)
        lowest = torch.topk(groups, n, dim=-1, largest=False).indices
        return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, lowest, True).reshape(rows, cols)
    k = int(sparsity * cols)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k:
        mask.scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, True)
    return mask


def mark_pruned(module: nn.Module) -> None:
    setattr(module, PRUNED, True)


def is_pruned(module: nn.Module) -> bool:
    return bool(getattr(module, PRUNED, False))


@torch.no_grad()
def input_sq_sums(ctx: BlockContext, names: list[str]) -> dict[str, Tensor]:
    """Per input channel, the sum of squares of each named linear's input over the real calibration
    tokens (one forward of the block, stopped before the last named linear's output is needed)."""
    sums: dict[str, Tensor] = {}
    with ctx.hook_inputs(names, sq_sum_adder(sums, ctx.device), only_real_tokens=True):
        ctx.forward_until(names[-1], inclusive=False)
    return sums


def sq_sum_adder(sums: dict[str, Tensor], device: torch.device) -> Callable[[str, Tensor], None]:
    """A `hook_inputs` callback adding each input's per-channel sum of squares into `sums`."""

    def add(name: str, rows: Tensor) -> None:
        sq = rows.float().pow(2).sum(dim=0).to(device)
        sums[name] = sq if name not in sums else sums[name] + sq

    return add


class SparseMethod(CompressionMethod):
    """A pruning method: `scores` per linear, or its own `process_block` (SparseGPT, ShortGPT)."""

    Special: ClassVar[type[BaseModel]] = NoSpecial
    prefers_sparsity_out: ClassVar[bool] = False
    """Whether blocks should by default see the pruned earlier blocks' outputs (`sparse.sparsity_out`)."""
    prunes_weights: ClassVar[bool] = True
    """False for methods that remove whole blocks (ShortGPT) instead of zeroing weights."""
    state_attrs = ("stage_seconds", "outlier_ratios", "pruned")

    def __init__(self, sparse: SparseSection) -> None:
        self.sparse = sparse
        try:
            self.special = self.Special.model_validate(sparse.special)
        except ValidationError as exc:
            raise ConfigError(
                f"{self.name}: {explain_validation_error(exc, root=self.Special, prefix='sparse.special.')}"
            ) from None
        w = sparse.weight
        if self.prunes_weights and w.sparsity is None and w.n_m is None and not isinstance(w.layer_sparsity, list):
            raise ConfigError(f"{self.name} needs sparse.weight.sparsity (e.g. 0.5) or sparse.weight.pattern: 2:4")
        self.outlier_ratios: dict[int, float] = {}
        """OWL: per block, the fraction of outlier scores (from the statistics pass)."""
        self.pruned: dict[str, tuple[int, int]] = {}
        """Per pruned linear (full name): (zeros, weights), for results.json."""
        self.stage_seconds: dict[str, float] = {}

    @property
    def wants_statistics_pass(self) -> bool:
        return self.sparse.weight.layer_sparsity == "owl"

    def check_model(self, n_blocks: int, widths: list[int]) -> None:
        """Fail before calibration if the pattern or the per-block list cannot apply."""
        w = self.sparse.weight
        if isinstance(w.layer_sparsity, list) and len(w.layer_sparsity) != n_blocks:
            raise ConfigError(
                f"sparse.weight.layer_sparsity has {len(w.layer_sparsity)} entries for a model of {n_blocks} "
                f"blocks; give one sparsity per block"
            )
        if w.n_m is not None:
            bad = [c for c in widths if c % w.n_m[1]]
            if bad:
                raise ModelError(
                    f"sparse.weight.pattern {w.pattern} needs input widths divisible by {w.n_m[1]}, but a linear "
                    f"has {bad[0]}; use pattern: unstructured or add it to sparse.ignored_layers"
                )

    def block_sparsity(self, index: int) -> float:
        w = self.sparse.weight
        if isinstance(w.layer_sparsity, list):
            return w.layer_sparsity[index]
        if w.layer_sparsity == "owl":
            return owl_sparsity(self.outlier_ratios, w.sparsity or 0.0, w.owl_lambda)[index]
        return w.sparsity or 0.0

    def collect_block(self, ctx: BlockContext) -> None:
        """OWL: the fraction of |W| * ||X|| scores above owl_m times the block's mean score."""
        norms = input_sq_sums(ctx, ctx.targets)
        scores = torch.cat([
            (ctx.block.get_submodule(n).weight.float().abs() * norms[n].sqrt()[None, :]).flatten()
            for n in ctx.targets if n in norms
        ])
        self.outlier_ratios[ctx.index] = float((scores > scores.mean() * self.sparse.weight.owl_m).float().mean())

    def scores(self, ctx: BlockContext, names: list[str]) -> dict[str, Tensor]:
        """Per named linear, a score per weight (lower = pruned first)."""
        raise NotImplementedError

    @torch.no_grad()
    def process_block(self, ctx: BlockContext) -> None:
        if not ctx.targets:
            return
        sparsity = self.block_sparsity(ctx.index)
        for name, score in self.scores(ctx, ctx.targets).items():
            module = ctx.block.get_submodule(name)
            mask = prune_mask(score, sparsity, self.sparse.weight.n_m)
            module.weight.masked_fill_(mask.to(module.weight.device), 0)
            self.record(ctx, name, module)

    def record(self, ctx: BlockContext, name: str, module: nn.Module) -> None:
        mark_pruned(module)
        zeros = int((module.weight == 0).sum())
        self.pruned[f"{ctx.adapter.blocks}.{ctx.index}.{name}"] = (zeros, module.weight.numel())

    def summary(self) -> dict:
        zeros = sum(z for z, _ in self.pruned.values())
        total = sum(n for _, n in self.pruned.values())
        out = {"method": self.name, "pattern": self.sparse.weight.pattern,
               "sparsity": zeros / total if total else 0.0, "pruned_linears": len(self.pruned)}
        if self.outlier_ratios:
            out["owl_block_sparsity"] = [self.block_sparsity(i) for i in sorted(self.outlier_ratios)]
        return out


def owl_sparsity(ratios: dict[int, float], target: float, lam: float) -> list[float]:
    """OWL (Yin et al., 2024, arXiv:2310.05175): blocks with more outliers keep more weights.
    Outlier ratios are mapped linearly onto [0, 2*lam], centred, and subtracted from the target,
    so the mean sparsity stays `target` and no block deviates more than `lam`."""
    values = torch.tensor([ratios[i] for i in sorted(ratios)], dtype=torch.float64)
    spread = values.max() - values.min()
    scaled = (values - values.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(values)
    return [float(v) for v in (target - (scaled - scaled.mean())).clamp(0, 0.99)]


def register_sparse_method(cls: type[SparseMethod]) -> type[SparseMethod]:
    for key in (cls.name, *cls.aliases):
        SPARSE_METHODS[key.lower()] = cls
    return cls


def sparse_method(sparse: SparseSection) -> SparseMethod:
    cls = SPARSE_METHODS.get(sparse.method.lower())
    if cls is None:
        names = sorted({c.name for c in SPARSE_METHODS.values()})
        close = difflib.get_close_matches(sparse.method, names, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"unknown sparse.method {sparse.method!r}; {hint}available: {', '.join(names)}")
    return cls(sparse)
