"""Model-level rotation of the residual stream, reached through the adapter's roles only (QuaRot,
SpinQuant-style methods).

Row-vector convention: a linear computes `y = x W^T + b` and a rotation `Q` (orthogonal) maps the
residual stream `x` to `x Q`. Exact in real arithmetic when every norm on the stream commutes with
Q, which RMSNorm with unit weight does (`norm(x Q) = norm(x) Q`): each norm's weight is first folded
into the linears that read its output. Then the embedding `E <- E Q`, the linears reading the stream
`W <- W Q` (columns), those writing to it `W <- Q^T W, b <- Q^T b` (rows), and the LM head `W <- W Q`.
Everything is computed in float64 on the run's device, one block at a time, and cast back.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from llmc.errors import ModelError
from llmc.models.adapter import ModelAdapter, expand_name, get_submodule_or_none
from llmc.pipeline.offload import on_device

ROWS_PER_CHUNK = 8192
"""Rows of the embedding / LM head rotated at once on the device (bounds the float64 copy)."""


@dataclass
class BlockPlan:
    """Which modules of one block a rotation touches (names relative to the block)."""

    norms: dict[str, list[str]]
    """Each norm on the stream and the modules that read its output (its weight folds into theirs)."""
    reads: list[str]
    """Linears (and float routers) reading the residual stream: columns rotated."""
    writes: list[str]
    """Linears writing to the residual stream: rows (and bias) rotated."""
    attn_v: str | None
    attn_out: list[str]
    mlp_out: list[str]


def present_names(block: nn.Module, patterns: tuple[str, ...]) -> list[str]:
    names = [n for p in patterns for n in expand_name(p, block)]
    return [n for n in dict.fromkeys(names) if get_submodule_or_none(block, n) is not None]


def block_plan(adapter: ModelAdapter, block: nn.Module) -> BlockPlan:
    roles = adapter.block_roles
    attn_in, mlp_in = present_names(block, roles.attn_in), present_names(block, roles.mlp_in)
    routers = present_names(block, roles.router)
    mlp_norm = roles.mlp_norm if roles.mlp_norm and get_submodule_or_none(block, roles.mlp_norm) else None
    also = {g.prev_op: list(g.also_reads) for g in adapter.block_groups(block) if g.also_reads}
    norms: dict[str, list[str]] = {}
    if mlp_norm is None:  # parallel attention: one norm feeds attention and MLP
        norms[roles.attn_norm] = attn_in + mlp_in + routers + also.get(roles.attn_norm, [])
    else:
        norms[roles.attn_norm] = attn_in + also.get(roles.attn_norm, [])
        norms[mlp_norm] = mlp_in + routers + also.get(mlp_norm, [])
    norms = {k: list(dict.fromkeys(v)) for k, v in norms.items()}
    reads = list(dict.fromkeys(n for readers in norms.values() for n in readers))
    attn_out, mlp_out = present_names(block, roles.attn_out), present_names(block, roles.mlp_out)
    return BlockPlan(norms, reads, attn_out + mlp_out, roles.attn_v, attn_out, mlp_out)


def commutes_with_rotation(norm: nn.Module, width: int) -> bool:
    """Whether `norm` with unit weight satisfies norm(x R) = norm(x) R (R a Householder reflection):
    true for RMSNorm, false for LayerNorm (mean subtraction) and for norms with a bias."""
    probe = copy.deepcopy(norm).float().cpu()
    with torch.no_grad():
        if isinstance(getattr(probe, "weight", None), Tensor):
            probe.weight.fill_(1.0)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(4, width, generator=gen) + 0.5
        v = torch.randn(width, generator=gen)
        reflect = torch.eye(width) - 2 * torch.outer(v, v) / v.dot(v)
        return torch.allclose(probe(x @ reflect), probe(x) @ reflect, rtol=1e-4, atol=1e-5)


def check_rotatable(model: nn.Module, adapter: ModelAdapter, method: str) -> None:
    """Raise ModelError (one line: the family and why) when the residual stream cannot be rotated."""
    name = adapter.name
    if adapter.roles is None or adapter.block_roles is None:
        raise ModelError(f"{method} cannot rotate {name}: its adapter declares no roles (embedding, norms, "
                         f"attention and MLP projections); add roles= and block_roles= to its declaration")
    roles = adapter.block_roles
    missing = [r for r in ("attn_norm", "attn_in", "attn_out", "mlp_in", "mlp_out") if not getattr(roles, r)]
    missing += [r for r in ("embedding", "final_norm", "lm_head") if adapter.role(model, r) is None]
    if missing:
        raise ModelError(f"{method} cannot rotate {name}: its adapter declares no {missing[0]} role; declare it")
    embedding = adapter.role(model, "embedding")
    width = embedding.weight.shape[1]
    norms = {}
    for block in adapter.get_blocks(model):
        post = present_names(block, roles.post_norms)
        if post:
            raise ModelError(
                f"{method} cannot rotate {name}: its blocks normalize the attention/MLP outputs ({post[0]}) before "
                f"the residual add, which does not commute with a rotation of the residual stream; use a method "
                f"without rotations (GPTQ, AWQ, SmoothQuant)"
            )
        for norm_name in block_plan(adapter, block).norms:
            norms[norm_name] = get_submodule_or_none(block, norm_name)
            if norms[norm_name] is None:
                raise ModelError(f"{method} cannot rotate {name}: this layout's blocks have no {norm_name!r}, the "
                                 f"norm its roles name; declare roles for this layout")
    norms[adapter.roles.final_norm] = adapter.role(model, "final_norm")
    for norm_name, norm in norms.items():
        if not commutes_with_rotation(norm, width):
            raise ModelError(
                f"{method} cannot rotate {name}: its norm {norm_name} ({type(norm).__name__}) subtracts the mean "
                f"or adds a bias, which does not commute with a rotation of the residual stream; use a method "
                f"without rotations (GPTQ, AWQ, SmoothQuant)"
            )


def untie_head(model: nn.Module, adapter: ModelAdapter) -> bool:
    """Give the LM head its own weight when it shares the embedding's; returns whether it did."""
    embedding, head = adapter.role(model, "embedding"), adapter.role(model, "lm_head")
    if head.weight.data_ptr() != embedding.weight.data_ptr():
        return False
    head.weight = nn.Parameter(embedding.weight.detach().clone(), requires_grad=False)
    configs = [model.config]
    if hasattr(model.config, "get_text_config"):
        configs.append(model.config.get_text_config())
    for config in configs:
        if hasattr(config, "tie_word_embeddings"):
            config.tie_word_embeddings = False
    if hasattr(model, "get_expanded_tied_weights_keys"):  # transformers 5 re-ties from this mapping
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)
    return True


@torch.no_grad()
def transform_linear(
    module: nn.Module, device: torch.device, *, left: Callable[[Tensor], Tensor] | None = None,
    right: Callable[[Tensor], Tensor] | None = None,
) -> None:
    """`W <- left(right(W))` in float64 on `device`: `right` acts on the columns (input side),
    `left` on the rows (output side, and on the bias as a column)."""
    weight = module.weight
    w = weight.detach().to(device, torch.float64)
    if right is not None:
        w = right(w)
    if left is not None:
        w = left(w)
    weight.copy_(w.to(weight.device, weight.dtype))
    bias = getattr(module, "bias", None)
    if left is not None and isinstance(bias, Tensor):
        bias.copy_(left(bias.detach().to(device, torch.float64)[:, None])[:, 0].to(bias.device, bias.dtype))


@torch.no_grad()
def transform_rows_chunked(weight: Tensor, matrix: Tensor, device: torch.device, scale: Tensor | None = None) -> None:
    """`weight <- weight diag(scale) matrix` (an embedding's rows, an LM head's columns), a chunk of rows
    at a time."""
    step = columns(matrix.to(device, torch.float64), None if scale is None else scale.to(device, torch.float64))
    for start in range(0, weight.shape[0], ROWS_PER_CHUNK):
        chunk = weight[start : start + ROWS_PER_CHUNK]
        chunk.copy_(step(chunk.detach().to(device, torch.float64)).to(weight.device, weight.dtype))


def columns(q: Tensor, scale: Tensor | None = None) -> Callable[[Tensor], Tensor]:
    """`W -> W diag(scale) q`."""
    return lambda w: (w * scale.to(w)[None, :] if scale is not None else w) @ q.to(w)


def rows(q: Tensor) -> Callable[[Tensor], Tensor]:
    """`W -> q^T W`: a linear's output `y` becomes `y q`."""
    return lambda w: q.to(w).t() @ w


def per_head_rows(h: Tensor) -> Callable[[Tensor], Tensor]:
    """Each head's rows `W_h -> h^T W_h` (its output slice `y_h` becomes `y_h h`)."""
    hd = h.shape[0]
    return lambda w: (h.to(w).t() @ w.reshape(-1, hd, w.shape[-1])).reshape(w.shape)


def per_head_columns(h: Tensor) -> Callable[[Tensor], Tensor]:
    """Each head's input columns `W[:, head] -> W[:, head] h` (it reads `x_h h`)."""
    hd = h.shape[0]
    return lambda w: (w.reshape(w.shape[0], -1, hd) @ h.to(w)).reshape(w.shape)


def heads_rotatable(model: nn.Module, adapter: ModelAdapter, block: nn.Module, plan: BlockPlan) -> int | None:
    """The head size when values and the output projection can be rotated per head: attn_v is a plain
    value projection (kv heads x head size rows) reading the stream, and one attn_out reads heads x head size."""
    if plan.attn_v not in plan.reads or len(plan.attn_out) != 1:
        return None
    v, o = get_submodule_or_none(block, plan.attn_v), block.get_submodule(plan.attn_out[0])
    try:
        hd = adapter.block_head_dim(block)
    except (AttributeError, TypeError, ValueError):
        return None
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if not isinstance(v, nn.Linear) or not isinstance(o, nn.Linear) or not heads or not hd:
        return None
    return hd if (v.out_features == kv_heads * hd and o.in_features == heads * hd) else None


def rotate_block(block: nn.Module, plan: BlockPlan, q: Tensor, device: torch.device, *,
                 head: Tensor | None = None, online: dict[str, Tensor] | None = None) -> None:
    """Fold the block's norms into their readers and rotate the block by `q`; with `head` (an orthogonal
    head-size matrix) rotate values and the output projection per head; `online` maps MLP output linears
    to the orthogonal matrix an online transform applies to their input (`W <- W M`)."""
    online = online or {}
    with on_device(block, device):
        scales = {}
        for norm_name, readers in plan.norms.items():
            weight = getattr(block.get_submodule(norm_name), "weight", None)
            if isinstance(weight, Tensor):
                scales.update({reader: weight.detach().to(device, torch.float64).clone() for reader in readers})
                with torch.no_grad():
                    weight.fill_(1.0)
        for name in plan.reads:
            left = per_head_rows(head) if head is not None and name == plan.attn_v else None
            transform_linear(block.get_submodule(name), device, left=left, right=columns(q, scales.get(name)))
        for name in plan.writes:
            right = None
            if head is not None and name in plan.attn_out:
                right = per_head_columns(head)
            elif name in online:
                right = columns(online[name])
            transform_linear(block.get_submodule(name), device, left=rows(q), right=right)

