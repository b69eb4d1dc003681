"""GPTQ's fused sweep (`gptq_block.quantize_group_fused`: one Triton launch per group that also fixes
the group's scale and zero point): which cases take it, and that it computes what the torch path does.

The dispatch test always runs (the launcher replaced by its torch equivalent). The kernel test runs
the kernel in Triton's CPU interpreter, in a subprocess with TRITON_INTERPRET=1 set by the test
(Triton reads it when the kernel is defined). It needs triton, which CUDA builds of torch ship and
CI's CPU-only install does not, so in CI it skips; tests/test_cuda.py runs the compiled kernel on a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib.util import find_spec

import pytest
import torch

from llmc.methods import gptq
from llmc.methods.gptq import gptq_quantize
from llmc.methods.gptq_block import quantize_block_torch
from llmc.quant.microscaling import MXQuantizer
from llmc.quant.quantizer import IntQuantizer


def problem(rows: int = 24, cols: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, cols, generator=gen) * torch.linspace(0.2, 3, cols)
    return torch.randn(rows, cols, generator=gen) * 0.05, 2 / 256 * x.T @ x


def int_q(**kw) -> IntQuantizer:
    args = {"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 32, **kw}
    return IntQuantizer(**args)


# name: (quantizer, gptq_quantize options, columns, whether the fused sweep runs)
CASES = {
    "asymmetric": (int_q(), {}, 96, True),
    "symmetric half_range bf16 scales": (int_q(symmetric=True, sym_scale="half_range", scale_dtype=torch.bfloat16),
                                         {}, 96, True),
    "partial last group": (int_q(partial_group=True), {}, 80, True),
    "actorder": (int_q(), {"actorder": True}, 96, False),
    "static_groups": (int_q(), {"static_groups": True}, 96, False),
    "per_channel": (int_q(granularity="per_channel", group_size=-1), {}, 96, False),
    "mse": (int_q(calib_algo="mse"), {}, 96, False),
    "percentile": (int_q(calib_algo="percentile"), {}, 96, False),
    "pruned weight": (int_q(), {"keep_zeros": True}, 96, False),
    "mxfp4": (MXQuantizer("e2m1"), {}, 96, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fused_sweep_only_where_it_applies(monkeypatch, case):
    """Where the fused launcher is used, the sweep gives exactly the torch path's result (the launcher
    here is its torch equivalent, so this checks the plumbing: views, reused error buffer, params)."""
    quantizer, options, cols, fused = CASES[case]
    weight, hessian = problem(cols=cols)
    if options.get("keep_zeros"):
        weight[weight.abs() < 0.02] = 0
    reference = gptq_quantize(weight, hessian, quantizer, **options)  # on the CPU: never fused
    calls = []

    def launcher(W1, Hinv1, Q1, Err1, scale, zero, slice_quantizer):
        assert W1.data_ptr() != Q1.data_ptr() and W1.stride(0) == cols and Q1.stride(0) == cols  # views, no copies
        calls.append(W1.shape[1])
        s, z = slice_quantizer.calc_qparams(W1)
        scale.copy_(s.view(-1))
        zero.copy_(z.view(-1))
        q, e = quantize_block_torch(W1.clone(), Hinv1, s, z, slice_quantizer.qmin, slice_quantizer.qmax)
        Q1.copy_(q)
        Err1.copy_(e)

    monkeypatch.setattr(gptq, "quantize_group_fused", launcher)
    monkeypatch.setattr(gptq, "use_triton", lambda W1: True)
    result = gptq_quantize(weight, hessian, quantizer, **options)
    assert calls == ([32] * (cols // 32) + [cols % 32] * (cols % 32 > 0) if fused else [])
    for got, want in zip((result.weight, result.scale, result.zero, result.g_idx),
                         (reference.weight, reference.scale, reference.zero, reference.g_idx)):
        assert torch.equal(got, want)

    monkeypatch.setattr(gptq, "use_triton", lambda W1: False)  # no Triton, or LLMC_GPTQ_KERNEL=torch
    calls.clear()
    gptq_quantize(weight, hessian, quantizer, **options)
    assert calls == []


KERNEL_SCRIPT = textwrap.dedent(
    """
    import torch
    from llmc.methods import gptq, gptq_block
    from llmc.methods.gptq import ColumnGrids, gptq_quantize
    from llmc.methods.hessian import inverse_hessian_cholesky
    from llmc.quant.quantizer import IntQuantizer

    assert not gptq_block.divides_by_reciprocal("cpu")
    torch.manual_seed(0)
    rows, cols = 20, 300  # rows: not a multiple of the row tile (16); 300 = 128 + 128 + a partial group of 44
    W = torch.randn(rows, cols) * 0.05
    X = torch.randn(512, cols) * torch.linspace(0.2, 3, cols)
    H = 2 / 512 * X.T @ X
    U = inverse_hessian_cholesky(H.clone(), 0.01)
    # Rows whose scale or zero point is a rounding tie, or whose range is one-sided or empty.
    for i1 in (128, 256):
        W[4:7, i1:] = W[4:7, i1:].abs()
        for row, peak in enumerate([7 * (1 + 2**-8), 7 * (1 + 3 * 2**-8), 7.5 * (1 + 3 * 2**-8), 7 * (1 + 3 * 2**-11),
                                    15 * (1 + 2**-8), 15 * (1 + 3 * 2**-8)]):
            W[row, i1 + 5] = peak
        W[7, i1:] = -W[7, i1:].abs()
        W[8, i1:] = 0
        W[9, i1 + 2], W[9, i1 + 3] = -2.5, 12.5  # zero point 2.5 rounds to 2

    def quantizers():
        for symmetric, sym_scale in ((False, "qmax"), (True, "qmax"), (True, "half_range")):
            for scale_dtype in (None, torch.bfloat16, torch.float16):
                yield IntQuantizer(bit=4, symmetric=symmetric, granularity="per_group", group_size=128,
                                   partial_group=True, sym_scale=sym_scale, scale_dtype=scale_dtype)

    for qz in quantizers():
        sq = ColumnGrids(W, qz).slice_quantizer
        for i1, i2 in ((128, 256), (256, 300)):
            Q, err = torch.zeros(rows, cols), torch.full((rows, 128), 7.0)
            scale, zero = torch.empty(rows), torch.empty(rows)
            before = W.clone()
            gptq_block.quantize_group_fused(W[:, i1:i2], U[i1:i2, i1:i2], Q[:, i1:i2], err[:, : i2 - i1], scale,
                                            zero, sq)
            assert torch.equal(W, before)
            assert Q[:, :i1].eq(0).all() and Q[:, i2:].eq(0).all() and err[:, i2 - i1 :].eq(7).all()
            s, z = sq.calc_qparams(W[:, i1:i2])
            assert torch.equal(scale, s.view(-1)) and torch.equal(zero, z.view(-1)), (qz, i1)
            q_ref, e_ref = gptq_block.quantize_block_triton(W[:, i1:i2].clone(), U[i1:i2, i1:i2], s, z, sq.qmin, sq.qmax)
            assert torch.equal(Q[:, i1:i2], q_ref) and torch.equal(err[:, : i2 - i1], e_ref), (qz, i1)
            q_torch, _ = gptq_block.quantize_block_torch(W[:, i1:i2].clone(), U[i1:i2, i1:i2], s, z, sq.qmin, sq.qmax)
            assert (Q[:, i1:i2] == q_torch).float().mean() > 0.99, (qz, i1)

    # The whole sweep: every launch's params are calc_qparams of the columns it got, Q is the torch path's.
    launch = gptq_block.quantize_group_fused
    checked = []

    def checking(W1, Hinv1, Q1, Err1, scale, zero, sq):
        columns = W1.clone()
        launch(W1, Hinv1, Q1, Err1, scale, zero, sq)
        s, z = sq.calc_qparams(columns)
        assert torch.equal(scale, s.view(-1)) and torch.equal(zero, z.view(-1))
        checked.append(W1.shape[1])

    gptq.quantize_group_fused = checking
    for qz in list(quantizers())[1::4]:  # asymmetric bf16, symmetric fp16, half_range None
        ref = gptq_quantize(W, H, qz)
        gptq.use_triton = lambda W1: True
        out = gptq_quantize(W, H, qz)
        gptq.use_triton = gptq_block.use_triton
        assert checked[-3:] == [128, 128, 44]
        assert (out.weight == ref.weight).float().mean() > 0.99, qz
        assert (out.scale == ref.scale).float().mean() > 0.99, qz
    print("ok")
    """
)


@pytest.mark.skipif(find_spec("triton") is None, reason="needs triton (ships with CUDA torch; not in CI)")
def test_fused_kernel_matches_torch_in_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", KERNEL_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
