"""The Triton GPTQ block kernel computes what the torch loop computes (run in Triton's CPU
interpreter here; tests/test_cuda.py covers the compiled kernel on a GPU)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib.util import find_spec

import pytest

pytestmark = pytest.mark.skipif(find_spec("triton") is None, reason="needs triton (ships with CUDA torch)")

SCRIPT = textwrap.dedent(
    """
    import torch
    import llmc.methods.gptq as gptq
    from llmc.methods import gptq_block
    from llmc.quant.quantizer import IntQuantizer

    torch.manual_seed(0)

    def case(rows, width, per_col, qmin, qmax):
        W = torch.randn(rows, width) * 0.05
        A = torch.randn(width, 2 * width)
        H = A @ A.T / width + 0.1 * torch.eye(width)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
        cols = width if per_col else 1
        S = torch.rand(rows, cols) * 0.02 + 0.005
        Z = torch.randint(qmin, qmax + 1, (rows, cols)).float() if qmin == 0 else torch.zeros(rows, cols)
        q_ref, e_ref = gptq_block.quantize_block_torch(W.clone(), Hinv, S, Z, qmin, qmax)
        q, e = gptq_block.quantize_block_triton(W.clone(), Hinv, S, Z, qmin, qmax)
        same = torch.isclose(q, q_ref, rtol=1e-5, atol=1e-7).float().mean().item()
        assert same > 0.995, (rows, width, per_col, same)
        torch.testing.assert_close(e[torch.isclose(q, q_ref)], e_ref[torch.isclose(q, q_ref)], rtol=1e-3, atol=1e-4)

    case(40, 128, False, 0, 15)
    case(33, 100, True, -4, 3)
    case(8, 1, False, 0, 255)

    # Whole GPTQ (grouped, actorder + static groups) with the kernel forced on.
    W = torch.randn(48, 96) * 0.05
    X = torch.randn(512, 96) * torch.linspace(0.1, 3, 96)
    H = 2 * X.T @ X / 512
    for kwargs in ({}, {"actorder": True, "static_groups": True}):
        qz = IntQuantizer(bit=4, symmetric=False, granularity="per_group", group_size=32)
        gptq_block.use_triton = lambda W1: False
        ref = gptq.gptq_quantize(W, H, qz, **kwargs)
        gptq.quantize_block = lambda W1, H1, S1, Z1, lo, hi, *_: gptq_block.quantize_block_triton(W1, H1, S1, Z1, lo, hi)
        out = gptq.gptq_quantize(W, H, qz, **kwargs)
        gptq.quantize_block = gptq_block.quantize_block
        same = torch.isclose(out.weight, ref.weight, rtol=1e-5, atol=1e-7).float().mean().item()
        assert same > 0.99, (kwargs, same)
    print("ok")
    """
)


def test_triton_kernel_matches_torch_loop():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
