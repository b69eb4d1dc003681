"""GPTQ's inner loop over the columns of one block, in torch and as one Triton kernel.

Within a block of columns GPTQ is sequential: column i is rounded, and its error, scaled by
row i of the inverse-Hessian factor, is subtracted from the columns after it. In torch every
column costs about ten small kernel launches, which dominates GPTQ on a GPU (tens of thousands
of columns per decoder layer). The Triton kernel keeps a tile of rows of the block in
registers and runs the whole column loop in one launch; rows are independent, so tiles run
in parallel. Both compute the same float32 arithmetic (division rounded to nearest,
round-half-to-even), up to fused multiply-adds in the update, so a weight can occasionally
land on the neighbouring grid point; tests/test_gptq_kernel.py, tests/test_gptq_fused.py (both in
Triton's CPU interpreter) and tests/test_cuda.py compare them.

The fused variant (`quantize_group_fused`) serves GPTQ's default sweep, integer per_group with
dynamic groups and minmax ranges, where each block is one group whose scale and zero point come
from its columns as updated by the groups before it. The kernel first computes them per row from
the tile it loaded, as `IntQuantizer.calc_qparams` does (same float32 operations, scale rounded to
the quantizer's scale_dtype, and a division by a Python number done the way torch does it on that
device), stores them, then runs the column loop. It reads W and the inverse-Hessian factor and
writes Q through their strides (no copies), so a block costs two launches, this kernel and the
sweep's update of the later columns, instead of about 28 (params, copies, kernel, update).

`LLMC_GPTQ_KERNEL=torch` forces the torch loop on CUDA too.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
from torch import Tensor

from llmc.quant.quantizer import IntQuantizer

try:  # Triton ships with CUDA builds of torch; CPU-only installs use the torch loop.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

# Adding and subtracting 1.5 * 2^23 rounds a float32 |x| < 2^22 to the nearest integer, ties
# to even (what torch.round does), with plain IEEE additions.
_MAGIC = 12582912.0
_LIMIT = 4194304.0
# Float32 fraction bits dropped when a scale is rounded to a half dtype (fp16 values in its normal
# range, where `representable_scale` clamps, keep 10 of the 23; bf16 keeps 7).
_DROP_BITS = {None: 0, torch.float16: 13, torch.bfloat16: 16}


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
    def _round_half_even(x):
        x = tl.minimum(tl.maximum(x, -_LIMIT_C), _LIMIT_C)
        return (x + _MAGIC_C) - _MAGIC_C

    @triton.jit
    def _minmax_params(w, qmin, qmax, steps, inv_steps, tiny, s_lo, s_hi,
                       SYMMETRIC: tl.constexpr, SCALAR_RCP: tl.constexpr, DROP: tl.constexpr):
        """Each row's (scale, zero) of the tile `w` (padding zeros: the range includes 0 anyway), as
        `IntQuantizer.params_from_range` computes them from `observe_range(..., "minmax")`."""
        xmin = tl.minimum(tl.min(w, axis=1), 0.0)
        xmax = tl.maximum(tl.max(w, axis=1), 0.0)
        span = tl.maximum(xmax, -xmin) if SYMMETRIC else xmax - xmin
        # what torch computes for `span / steps` on this device (see `divides_by_reciprocal`)
        scale = span * inv_steps if SCALAR_RCP else tl.math.div_rn(span, steps)
        scale = tl.maximum(scale, tiny)
        if DROP > 0:  # `representable_scale`: clamp, then round to nearest even on the integer bits
            bits = tl.minimum(tl.maximum(scale, s_lo), s_hi).to(tl.int32, bitcast=True)
            bits = (bits + ((1 << (DROP - 1)) - 1) + ((bits >> DROP) & 1)) & -(1 << DROP)
            scale = bits.to(tl.float32, bitcast=True)
        if SYMMETRIC:
            zero = tl.zeros_like(scale)
        else:
            zero = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(-xmin, scale)), qmin), qmax)
        return scale, zero

    @triton.jit
    def _gptq_block_kernel(
        w_ptr, q_ptr, e_ptr, h_ptr, s_ptr, z_ptr, rows, stride_w, stride_q, stride_e, stride_h, stride_s,
        qmin, qmax, steps, inv_steps, tiny, s_lo, s_hi,
        width: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, PER_COL: tl.constexpr,
        FUSED: tl.constexpr, SYMMETRIC: tl.constexpr, SCALAR_RCP: tl.constexpr, DROP: tl.constexpr,
    ):
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        r64 = r.to(tl.int64)  # row offsets of a view into a whole weight can pass 2^31
        c = tl.arange(0, BLOCK_C)
        rmask = r < rows
        cmask = c < width
        mask = rmask[:, None] & cmask[None, :]
        w = tl.load(w_ptr + r64[:, None] * stride_w + c[None, :], mask=mask, other=0.0)
        if FUSED:  # the params come from this tile and are an output
            s_row, z_row = _minmax_params(w, qmin, qmax, steps, inv_steps, tiny, s_lo, s_hi, SYMMETRIC,
                                          SCALAR_RCP, DROP)
            tl.store(s_ptr + r64 * stride_s, s_row, mask=rmask)
            tl.store(z_ptr + r64 * stride_s, z_row, mask=rmask)
        elif PER_COL:
            s_all = tl.load(s_ptr + r64[:, None] * stride_s + c[None, :], mask=mask, other=1.0)
            z_all = tl.load(z_ptr + r64[:, None] * stride_s + c[None, :], mask=mask, other=0.0)
        else:
            s_row = tl.load(s_ptr + r64 * stride_s, mask=rmask, other=1.0)
            z_row = tl.load(z_ptr + r64 * stride_s, mask=rmask, other=0.0)
        q_out = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        e_out = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        for i in tl.range(0, width):  # width is a constexpr: one compile per block width
            sel = (c == i)[None, :]
            wi = tl.sum(tl.where(sel, w, 0.0), axis=1)
            if PER_COL and not FUSED:
                si = tl.sum(tl.where(sel, s_all, 0.0), axis=1)
                zi = tl.sum(tl.where(sel, z_all, 0.0), axis=1)
            else:
                si = s_row
                zi = z_row
            x = _round_half_even(tl.math.div_rn(wi, si))
            q = (tl.minimum(tl.maximum(x + zi, qmin), qmax) - zi) * si
            d = tl.load(h_ptr + i * stride_h + i)
            err = tl.math.div_rn(wi - q, d)
            h = tl.load(h_ptr + i * stride_h + c, mask=cmask & (c >= i), other=0.0)
            w = w - err[:, None] * h[None, :]
            q_out = tl.where(sel, q[:, None], q_out)
            e_out = tl.where(sel, err[:, None], e_out)
        tl.store(q_ptr + r64[:, None] * stride_q + c[None, :], q_out, mask=mask)
        tl.store(e_ptr + r64[:, None] * stride_e + c[None, :], e_out, mask=mask)


def _tiles(width: int) -> tuple[int, int]:
    block_c = max(16, triton.next_power_of_2(width))
    return max(1, min(32, 2048 // block_c)), block_c


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
    block_r, block_c = _tiles(width)
    _gptq_block_kernel[(triton.cdiv(rows, block_r),)](
        W1, Q1, Err1, Hinv1, S1, Z1, rows, W1.stride(0), Q1.stride(0), Err1.stride(0), Hinv1.stride(0),
        S1.stride(0), float(qmin), float(qmax), 1.0, 1.0, 0.0, 0.0, 0.0, width=width, BLOCK_R=block_r,
        BLOCK_C=block_c, PER_COL=S1.shape[1] > 1, FUSED=False, SYMMETRIC=False, SCALAR_RCP=False, DROP=0,
        num_warps=4,
    )
    return Q1, Err1


def _f32(x: float) -> float:
    """`x` rounded to float32, as torch rounds a Python number it applies to a float32 tensor."""
    return torch.tensor(x, dtype=torch.float32).item()


@functools.cache
def divides_by_reciprocal(device_type: str) -> bool:
    """Whether torch computes `float32 tensor / Python number` on this device type as `a * (1 / b)`, the
    reciprocal rounded to float32 (CUDA does, as an optimization; the CPU divides). 3 / 7 tells them apart."""
    got = (torch.full((1,), 3.0, device=device_type) / 7).item()
    return got == (torch.tensor(3.0) * (torch.tensor(1.0) / torch.tensor(7.0))).item()


@functools.lru_cache(maxsize=64)
def _params_args(q: IntQuantizer) -> tuple[float, ...]:
    """The kernel's float32 constants of `params_from_range`: qmin, qmax, steps, 1 / steps, the scale's
    lower bound, and the scale_dtype's (tiny, max) range."""
    steps = q.qmax if not q.symmetric or q.sym_scale == "qmax" else (q.qmax - q.qmin) / 2
    half = torch.finfo(q.scale_dtype) if _DROP_BITS.get(q.scale_dtype) else None
    return (float(q.qmin), float(q.qmax), _f32(steps), (torch.tensor(1.0) / torch.tensor(_f32(steps))).item(),
            _f32(torch.finfo(torch.float32).tiny * 1e3), _f32(half.tiny) if half else 0.0,
            _f32(half.max) if half else 0.0)


def quantize_group_fused(
    W1: Tensor, Hinv1: Tensor, Q1: Tensor, Err1: Tensor, scale: Tensor, zero: Tensor, quantizer: IntQuantizer
) -> None:
    """One group of a dynamic per_group sweep in one launch: each row's scale and zero point from
    `W1` `[rows, width]` as `quantizer.calc_qparams(W1)` computes them (minmax; a per_channel
    quantizer on the group's columns) into `scale`/`zero` `[rows]`, then `quantize_block_torch`
    with them, writing Q into `Q1` and the scaled errors into `Err1`. `W1` is only read. All float32
    on one device; `W1`, `Q1`, `Err1` and `Hinv1` may be row-strided views (columns contiguous)."""
    rows, width = W1.shape
    assert all(t.stride(-1) == 1 for t in (W1, Hinv1, Q1, Err1, scale, zero)), "columns must be contiguous"
    block_r, block_c = _tiles(width)
    _gptq_block_kernel[(triton.cdiv(rows, block_r),)](
        W1, Q1, Err1, Hinv1, scale, zero, rows, W1.stride(0), Q1.stride(0), Err1.stride(0), Hinv1.stride(0),
        scale.stride(0), *_params_args(quantizer), width=width, BLOCK_R=block_r, BLOCK_C=block_c,
        PER_COL=False, FUSED=True, SYMMETRIC=quantizer.symmetric, SCALAR_RCP=divides_by_reciprocal(W1.device.type),
        DROP=_DROP_BITS.get(quantizer.scale_dtype, 0), num_warps=4,
    )


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
