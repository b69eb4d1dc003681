"""The Hessian of a layer's reconstruction loss, shared by GPTQ and SparseGPT (both are optimal
brain surgeon updates with H = 2/n X^T X of the layer's input): accumulation from the block's
calibration forward, the upper Cholesky factor of the damped inverse, and the sweep over the
columns in blocks with lazy batch updates that both solvers run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from llmc.errors import NumericsError
from llmc.pipeline.blockwise import BlockContext
from llmc.pipeline.distributed import all_reduce, is_distributed

DAMP_RETRIES = 4
HALF_GEMM_FP32_OUT = [True]
"""Whether this torch build has CUDA `mm(..., out_dtype=float32)` for half inputs (probed on first use)."""


def inverse_hessian_cholesky(hessian: Tensor, percdamp: float) -> Tensor:
    """Upper Cholesky factor U of (H + damp*I)^-1 = U^T U. `hessian` is used up: damped in place (the
    damping grows 10x per retry while H + damp*I is not positive definite), then its storage holds the
    triangular solve; the caller must not read it again.

    One Cholesky factorization and one triangular solve, instead of the reference code's
    Cholesky, `cholesky_inverse` and second Cholesky (half the arithmetic): with J the
    reversal of rows and columns, J H J = L L^T gives H^-1 = (J L^-1 J)^T (J L^-1 J), and
    J L^-1 J is upper triangular with a positive diagonal, so it is U. Two `[in, in]` at most are
    alive at once (H and the factor, then the solve and U): 0.9 GiB for an 11008-column down_proj.
    """
    diag = hessian.diagonal()
    damp = percdamp * diag.mean().item()
    added = 0.0
    for _ in range(DAMP_RETRIES):
        diag.add_(damp - added)
        added = damp
        flipped = hessian.flip(0, 1)
        chol, info = torch.linalg.cholesky_ex(flipped, out=(flipped, torch.empty((), dtype=torch.int32,
                                                                                device=flipped.device)))
        if info.item() == 0 and all_finite(chol):
            eye = hessian.zero_()  # H is done with: its storage becomes the identity the solve overwrites
            eye.diagonal().fill_(1)
            inverse = torch.linalg.solve_triangular(chol, eye, upper=False, out=eye)
            del chol, flipped, eye  # the factor is done with before the flipped copy of the inverse
            upper = inverse.flip(0, 1)
            del inverse
            if all_finite(upper):
                return upper
            raise NumericsError(f"the inverse Hessian overflows float32 (damping {damp:.3g}); the calibration "
                                "activations are degenerate: use more or other calibration data, a larger "
                                "quant.special.percdamp, or model.torch_dtype: float32")
        damp *= 10
    raise NumericsError(
        f"the Hessian is not positive definite even with damping {damp / 10:.3g} "
        f"({DAMP_RETRIES} tries from percdamp); the calibration activations are degenerate or not finite: "
        f"use more or other calibration data, a larger quant.special.percdamp, or model.torch_dtype: float32"
    )


def all_finite(t: Tensor) -> bool:
    """Whether `t` holds no NaN or Inf, without `torch.isfinite`'s temporaries (several copies of `t`):
    any of them makes the float64 sum NaN or Inf, which no sum of float32 values reaches otherwise."""
    return bool(torch.isfinite(t.sum(dtype=torch.float64)))


def obs_problem(weight: Tensor, hessian: Tensor, consume_hessian: bool = False) -> tuple[Tensor, Tensor]:
    """float32 copies of `weight` `[out, in]` and its input's `hessian` `[in, in]` for a solve.

    With `consume_hessian` a float32 Hessian is used in place instead of copied (one `[in, in]`
    less at the peak); the caller must not reuse it. A column whose input is always zero does not
    matter: its weights are zeroed (they cannot widen a range) and its diagonal set to 1.
    """
    W = weight.detach().float().clone()
    H = hessian.detach().to(W.device, torch.float32)
    if H.data_ptr() == hessian.data_ptr() and not consume_hessian:
        H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    return W, H


BlockSolver = Callable[[int, int, Tensor], tuple[Tensor, Tensor]]
"""`(i1, i2, W1)`: round and/or prune the columns `i1:i2` of a sweep, given `W1`, a copy of them
updated by every earlier block; returns (Q1, Err1), the new columns and their scaled errors."""


BlockWriter = Callable[[int, int, Tensor, Tensor], Tensor]
"""`(i1, i2, W1, Q1)`: a `BlockSolver` that gets the view `W[:, i1:i2]` itself (not read after the
block), writes the new columns into the view `Q1 = Q[:, i1:i2]` and returns Err1 (no copies)."""


def obs_sweep(W: Tensor, U: Tensor, blocksize: int, solve_block: BlockSolver | BlockWriter,
              writes_q: bool = False) -> Tensor:
    """The column sweep of GPTQ and SparseGPT (lazy batch updates): the columns of `W` in blocks of
    `blocksize`; each block is solved by `solve_block` (which spreads each column's error over the
    block's later columns) and its errors then update all later columns at once through the rows
    `U[i1:i2, i2:]` of the inverse-Hessian factor. `W` is updated in place; returns Q. With
    `writes_q`, `solve_block` is a `BlockWriter`."""
    Q = torch.zeros_like(W)
    cols = W.shape[1]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        if writes_q:
            Err1 = solve_block(i1, i2, W[:, i1:i2], Q[:, i1:i2])
        else:
            Q1, Err1 = solve_block(i1, i2, W[:, i1:i2].clone())
            Q[:, i1:i2] = Q1
        W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1)
    return Q


GRAM_TILE = 2048
"""Column tile of the half-precision Hessian GEMMs (see `add_gram`)."""


def add_gram(total: Tensor | None, x: Tensor) -> tuple[Tensor, bool]:
    """`total + x^T x` in float32 (a new zero matrix when `total` is None); returns it and whether only
    the strips of rows right of the diagonal were added (`symmetrize` completes it once summed).

    Half-precision rows (bf16/fp16) on CUDA go through half-precision tensor cores with a float32
    result: every product of two such values is exact in float32 and the GEMM accumulates in
    float32, so this is the float32 product without a float32 copy of the rows. Wider than one tile,
    each strip of `GRAM_TILE` rows is multiplied from its diagonal tile rightwards only (x^T x is
    symmetric): 75% of the arithmetic at 4096 columns, 60% at 11008 (a 7B down_proj, whose Hessian
    is the largest GEMM of GPTQ's passes).
    """
    n = x.shape[1]
    if total is None:
        total = torch.zeros(n, n, device=x.device)
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and HALF_GEMM_FP32_OUT[0]:
        try:
            if n <= GRAM_TILE:
                return total.add_(torch.mm(x.T, x, out_dtype=torch.float32)), False
            for a in range(0, n, GRAM_TILE):
                rows = x[:, a : a + GRAM_TILE].T
                total[a : a + GRAM_TILE, a:].add_(torch.mm(rows, x[:, a:], out_dtype=torch.float32))
            return total, True
        except (RuntimeError, NotImplementedError):  # a torch build without mm(out_dtype=)
            HALF_GEMM_FP32_OUT[0] = False
    x = x.float()
    return total.addmm_(x.T, x), False


def symmetrize(strips: Tensor) -> Tensor:
    """Complete, in place, a sum `add_gram` kept to its strips of rows right of the diagonal: each
    strip's part below the diagonal tiles is the transpose of its part right of them."""
    n = strips.shape[0]
    for a in range(0, n, GRAM_TILE):
        b = a + GRAM_TILE
        strips[b:, a:b] = strips[a:b, b:].T
    return strips


@torch.no_grad()
def group_hessians(
    ctx: BlockContext,
    groups: list[list[tuple[str, nn.Module]]],
    replay: dict[str, list] | None = None,
    record: Sequence[str] = (),
    keep_input: list[Tensor] | None = None,
) -> tuple[list[Tensor], dict[str, list]]:
    """One forward over the calibration set, stopping before the last group's first linear runs;
    H = 2/n X^T X of each group's input (real tokens only), and the outputs of `record`. With
    `keep_input` (a list), the last group's first linear's whole input of every batch is appended to it."""
    first = [group[0][0] for group in groups]
    sums: dict[str, Tensor | None] = dict.fromkeys(first)
    tokens = dict.fromkeys(first, 0)
    upper_only: set[str] = set()

    def add(name: str, rows: Tensor) -> None:
        sums[name], tiled = add_gram(sums[name], rows.to(ctx.device))
        if tiled:
            upper_only.add(name)
        tokens[name] += rows.shape[0]

    # the raw input (an online input transform is the linear's own business when it is replayed)
    keeping = None if keep_input is None else ctx.block.get_submodule(first[-1]).register_forward_pre_hook(
        lambda _m, args: keep_input.append(args[0]))
    try:
        with ctx.hook_inputs(first, add, only_real_tokens=True):
            # groups are in execution order; later layers are not needed
            recorded = ctx.forward_until(first[-1], inclusive=False, replay=replay, record=record)
    finally:
        if keeping is not None:
            keeping.remove()
    for name in upper_only:
        symmetrize(sums[name])
    widths = [group[0][1].in_features for group in groups]
    return finish_hessians([sums[n] for n in first], [tokens[n] for n in first], widths, ctx.device), recorded


def finish_hessians(sums: list[Tensor | None], tokens: list[int], widths: list[int], device: torch.device
                    ) -> list[Tensor]:
    """H = 2/n X^T X from each group's summed `x^T x` (None: no token) and token count `n`. In a
    data-parallel run (`llmc.pipeline.distributed`) the sums and counts of every rank are added first:
    the one place the statistics of every Hessian-based method are reduced."""
    if is_distributed():
        sums = [torch.zeros(w, w, device=device) if s is None else s for s, w in zip(sums, widths)]
        counts = torch.tensor(tokens, dtype=torch.int64, device=device)
        all_reduce([*sums, counts])
        tokens = counts.tolist()
    # A group no token reached (an MoE expert its router never chose, calibrated on routed tokens only)
    # has no statistics: the identity (no preference among columns) makes the solve plain rounding,
    # where a zero Hessian would mark every column dead and zero the weight.
    return [s.mul_(2 / n) if n else torch.eye(w, device=device) for s, n, w in zip(sums, tokens, widths)]
