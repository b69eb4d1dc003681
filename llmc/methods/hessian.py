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
    """Upper Cholesky factor U of (H + damp*I)^-1 = U^T U, damping `hessian` in place; the damping
    grows 10x per retry while H + damp*I is not positive definite.

    One Cholesky factorization and one triangular solve, instead of the reference code's
    Cholesky, `cholesky_inverse` and second Cholesky (half the arithmetic): with J the
    reversal of rows and columns, J H J = L L^T gives H^-1 = (J L^-1 J)^T (J L^-1 J), and
    J L^-1 J is upper triangular with a positive diagonal, so it is U.
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
        if info.item() == 0 and torch.isfinite(chol).all():
            eye = torch.eye(chol.shape[0], device=chol.device, dtype=chol.dtype)
            inverse = torch.linalg.solve_triangular(chol, eye, upper=False, out=eye)
            del chol, flipped  # the factor is done with before the flipped copy of the inverse
            upper = inverse.flip(0, 1)
            del inverse
            if torch.isfinite(upper).all():
                return upper
        damp *= 10
    raise NumericsError(
        f"the Hessian is not positive definite even with damping {damp / 10:.3g} "
        f"({DAMP_RETRIES} tries from percdamp); the calibration activations are degenerate or not finite: "
        f"use more or other calibration data, a larger quant.special.percdamp, or model.torch_dtype: float32"
    )


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


def obs_sweep(W: Tensor, U: Tensor, blocksize: int, solve_block: BlockSolver) -> Tensor:
    """The column sweep of GPTQ and SparseGPT (lazy batch updates): the columns of `W` in blocks of
    `blocksize`; each block is solved by `solve_block` (which spreads each column's error over the
    block's later columns) and its errors then update all later columns at once through the rows
    `U[i1:i2, i2:]` of the inverse-Hessian factor. `W` is updated in place; returns Q."""
    Q = torch.zeros_like(W)
    cols = W.shape[1]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        Q1, Err1 = solve_block(i1, i2, W[:, i1:i2].clone())
        Q[:, i1:i2] = Q1
        W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1)
    return Q


def add_gram(total: Tensor | None, x: Tensor) -> Tensor:
    """`total + x^T x` in float32 (a new zero matrix when `total` is None).

    Half-precision rows (bf16/fp16) on CUDA go through half-precision tensor cores with a float32
    result: every product of two such values is exact in float32 and the GEMM accumulates in
    float32, so this is the float32 product without a float32 copy of the rows. (On the 7B
    benchmark the Hessian stage took 21.1 s this way against 19.2 s with TF32 GEMMs in the
    previous session: its time is the block forwards, not these GEMMs.)
    """
    if total is None:
        total = torch.zeros(x.shape[1], x.shape[1], device=x.device)
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and HALF_GEMM_FP32_OUT[0]:
        try:
            return total.add_(torch.mm(x.T, x, out_dtype=torch.float32))
        except (RuntimeError, NotImplementedError):  # a torch build without mm(out_dtype=)
            HALF_GEMM_FP32_OUT[0] = False
    x = x.float()
    return total.addmm_(x.T, x)




@torch.no_grad()
def group_hessians(
    ctx: BlockContext,
    groups: list[list[tuple[str, nn.Module]]],
    replay: dict[str, list] | None = None,
    record: Sequence[str] = (),
) -> tuple[list[Tensor], dict[str, list]]:
    """One forward over the calibration set, stopping before the last group's first linear runs;
    H = 2/n X^T X of each group's input (real tokens only), and the outputs of `record`."""
    first = [group[0][0] for group in groups]
    sums: dict[str, Tensor | None] = dict.fromkeys(first)
    tokens = dict.fromkeys(first, 0)

    def add(name: str, rows: Tensor) -> None:
        sums[name] = add_gram(sums[name], rows.to(ctx.device))
        tokens[name] += rows.shape[0]

    with ctx.hook_inputs(first, add, only_real_tokens=True):
        # groups are in execution order; later layers are not needed
        recorded = ctx.forward_until(first[-1], inclusive=False, replay=replay, record=record)
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
