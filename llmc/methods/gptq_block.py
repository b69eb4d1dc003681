"""GPTQ's inner loop over the columns of one block, in torch and as one Triton kernel.

Within a block of columns GPTQ is sequential: column i is rounded, and its error, scaled by
row i of the inverse-Hessian factor, is subtracted from the columns after it. In torch every
column costs about ten small kernel launches, which dominates GPTQ on a GPU (tens of thousands
of columns per decoder layer). The Triton kernel keeps a tile of rows of the block in
registers and runs the whole column loop in one launch; rows are independent, so tiles run
in parallel. Both compute the same float32 arithmetic (division rounded to nearest,
round-half-to-even), up to fused multiply-adds in the update, so a weight can occasionally
land on the neighbouring grid point; tests/test_gptq.py and tests/test_cuda.py compare them.

`LLMC_GPTQ_KERNEL=torch` forces the torch loop on CUDA too.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor

try:  # Triton ships with CUDA builds of torch; CPU-only installs use the torch loop.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

# Adding and subtracting 1.5 * 2^23 rounds a float32 |x| < 2^22 to the nearest integer, ties
# to even (what torch.round does), with plain IEEE additions.
_MAGIC = 12582912.0
_LIMIT = 4194304.0


ColumnQdq = Callable[[Tensor, Tensor, Tensor], Tensor]
"""`(w, scale, zero) -> q`: a float format's rounding of one column (NVFP4, MX) instead of the integer grid."""


def quantize_block_torch(
    W1: Tensor, Hinv1: Tensor, S1: Tensor | None, Z1: Tensor | None, qmin: int, qmax: int,
    prune1: Tensor | None = None, qdq: ColumnQdq | None = None,
) -> tuple[Tensor, Tensor]:
    """Quantize the columns of `W1` [rows, width] in order; returns (Q1, Err1).

    `S1`/`Z1` are the scale and zero point of each column, `[rows, width]`, or `[rows, 1]` when
    the whole block shares them; None: no rounding (SparseGPT pruning alone). `W1` is updated in
    place (a column view of a wider block works). Weights where the bool `prune1` is set become
    zero (a pruned model keeps its zeros; their error is spread as well). With `qdq` each column
    is rounded by it (a float format) instead of to the integer grid `qmin..qmax`.
    """
    Q1 = torch.empty_like(W1)
    Err1 = torch.empty_like(W1)
    per_col = S1 is not None and S1.shape[1] > 1
    for i in range(W1.shape[1]):
        w = W1[:, i]
        if S1 is None:
            q = w
        else:
            s = S1[:, i] if per_col else S1[:, 0]
            z = Z1[:, i] if per_col else Z1[:, 0]
            q = qdq(w, s, z) if qdq is not None else (torch.clamp(torch.round(w / s) + z, qmin, qmax) - z) * s
        if prune1 is not None:
            q = q.masked_fill(prune1[:, i], 0)
        Q1[:, i] = q
        err = (w - q) / Hinv1[i, i]
        W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)
        Err1[:, i] = err
    return Q1, Err1


if triton is not None:
    _MAGIC_C = tl.constexpr(_MAGIC)
    _LIMIT_C = tl.constexpr(_LIMIT)

    @triton.jit
    def _gptq_block_kernel(
        w_ptr, q_ptr, e_ptr, h_ptr, s_ptr, z_ptr, rows, stride_w, stride_h, stride_s, qmin, qmax,
        width: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, PER_COL: tl.constexpr,
    ):
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.arange(0, BLOCK_C)
        rmask = r < rows
        cmask = c < width
        mask = rmask[:, None] & cmask[None, :]
        w = tl.load(w_ptr + r[:, None] * stride_w + c[None, :], mask=mask, other=0.0)
        if PER_COL:
            s_all = tl.load(s_ptr + r[:, None] * stride_s + c[None, :], mask=mask, other=1.0)
            z_all = tl.load(z_ptr + r[:, None] * stride_s + c[None, :], mask=mask, other=0.0)
        else:
            s_row = tl.load(s_ptr + r * stride_s, mask=rmask, other=1.0)
            z_row = tl.load(z_ptr + r * stride_s, mask=rmask, other=0.0)
        q_out = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        e_out = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        for i in tl.range(0, width):  # width is a constexpr: one compile per block width
            sel = (c == i)[None, :]
            wi = tl.sum(tl.where(sel, w, 0.0), axis=1)
            if PER_COL:
                si = tl.sum(tl.where(sel, s_all, 0.0), axis=1)
                zi = tl.sum(tl.where(sel, z_all, 0.0), axis=1)
            else:
                si = s_row
                zi = z_row
            x = tl.minimum(tl.maximum(tl.math.div_rn(wi, si), -_LIMIT_C), _LIMIT_C)
            x = (x + _MAGIC_C) - _MAGIC_C
            q = (tl.minimum(tl.maximum(x + zi, qmin), qmax) - zi) * si
            d = tl.load(h_ptr + i * stride_h + i)
            err = tl.math.div_rn(wi - q, d)
            h = tl.load(h_ptr + i * stride_h + c, mask=cmask & (c >= i), other=0.0)
            w = w - err[:, None] * h[None, :]
            q_out = tl.where(sel, q[:, None], q_out)
            e_out = tl.where(sel, err[:, None], e_out)
        out = r[:, None] * stride_w + c[None, :]
        tl.store(q_ptr + out, q_out, mask=mask)
        tl.store(e_ptr + out, e_out, mask=mask)


def quantize_block_triton(
    W1: Tensor, Hinv1: Tensor, S1: Tensor, Z1: Tensor, qmin: int, qmax: int
) -> tuple[Tensor, Tensor]:
    """The same as `quantize_block_torch`, one kernel launch (float32 tensors on one device)."""
    W1, Hinv1 = W1.contiguous(), Hinv1.contiguous()
    rows, width = W1.shape
    S1 = S1.float().expand(rows, S1.shape[1]).contiguous()
    Z1 = Z1.float().expand(rows, Z1.shape[1]).contiguous()
    Q1 = torch.empty_like(W1)
    Err1 = torch.empty_like(W1)
    block_c = max(16, triton.next_power_of_2(width))
    block_r = max(1, min(32, 2048 // block_c))
    _gptq_block_kernel[(triton.cdiv(rows, block_r),)](
        W1, Q1, Err1, Hinv1, S1, Z1, rows, W1.stride(0), Hinv1.stride(0), S1.stride(0),
        float(qmin), float(qmax), width=width, BLOCK_R=block_r, BLOCK_C=block_c, PER_COL=S1.shape[1] > 1, num_warps=4,
    )
    return Q1, Err1


def use_triton(W1: Tensor) -> bool:
    return (
        triton is not None
        and W1.is_cuda
        and W1.shape[1] <= 256
        and os.environ.get("LLMC_GPTQ_KERNEL", "triton") != "torch"
    )


def quantize_block(
    W1: Tensor, Hinv1: Tensor, S1: Tensor | None, Z1: Tensor | None, qmin: int, qmax: int,
    prune1: Tensor | None = None, qdq: ColumnQdq | None = None,
) -> tuple[Tensor, Tensor]:
    # The Triton kernel has no mask and rounds to integers: pruned models and float formats take the torch loop.
    if prune1 is not None or S1 is None or qdq is not None:
        return quantize_block_torch(W1, Hinv1, S1, Z1, qmin, qmax, prune1, qdq)
    fn = quantize_block_triton if use_triton(W1) else quantize_block_torch
    return fn(W1, Hinv1, S1, Z1, qmin, qmax)
