"""Hadamard matrices of LLM widths (Sylvester, Paley I/II over prime fields and GF(p^k)), the random
Hadamard and random orthogonal rotations, and the online transform module."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from torch import nn

from llmc.quant.hadamard import (
    OnlineHadamard,
    fwht,
    hadamard_factor,
    hadamard_matrix,
    jacobsthal,
    orthogonal_hadamard,
    prime_power,
    random_orthogonal,
    sylvester,
)

# SmolLM2-135M hidden/MLP, head dims, Llama-2-7B/13B, Llama-3-8B, Qwen2.5 widths, SmolLM2-360M
MODEL_WIDTHS = [576, 1536, 64, 128, 4096, 11008, 14336, 5120, 13824, 3584, 18944, 8960, 960, 2560]
# (n, m): the dense part each uses
EXPECTED_M = {576: 36, 1536: 12, 4096: 1, 11008: 344, 14336: 28, 18944: 148, 13824: 108, 960: 60}


@pytest.mark.parametrize("n", MODEL_WIDTHS)
def test_model_widths_factor_into_a_hadamard_kron_sylvester(n):
    hm, p = hadamard_factor(n)
    m = hm.shape[0]
    assert m * p == n and p & (p - 1) == 0
    assert set(hm.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(hm @ hm.T, m * torch.eye(m, dtype=torch.float64))
    if n in EXPECTED_M:
        assert m == EXPECTED_M[n]


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 24, 28, 36, 40, 44, 52, 60, 72, 96, 108, 148, 344, 576, 1536])
def test_full_matrices_are_hadamard(n):
    h = hadamard_matrix(n)
    assert h.shape == (n, n) and set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


def test_prime_power_fields_and_jacobsthal():
    assert prime_power(27) == (3, 3) and prime_power(343) == (7, 3) and prime_power(12) is None
    for q in (7, 27, 9, 25, 13):  # prime and prime-power fields, both residues mod 4
        j = jacobsthal(q)
        assert (j.diagonal() == 0).all()
        assert (j.sum(axis=1) == 0).all()  # as many squares as non-squares
        assert (j @ j.T == q * np.eye(q) - 1).all()  # Q Q^T = q I - J
        assert (j == (j.T if q % 4 == 1 else -j.T)).all()


def test_orders_without_a_construction_fall_back_to_a_seeded_random_orthogonal(caplog):
    assert hadamard_factor(92) is None and hadamard_factor(6) is None
    with pytest.raises(ValueError, match="no Hadamard construction of order 92"):
        hadamard_matrix(92)
    with caplog.at_level(logging.WARNING, logger="llmc"):
        q = orthogonal_hadamard(92, seed=3)
    assert "order 92" in caplog.text and "random orthogonal" in caplog.text
    torch.testing.assert_close(q @ q.T, torch.eye(92, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(q, orthogonal_hadamard(92, seed=3)) and not torch.equal(q, orthogonal_hadamard(92, seed=4))


@pytest.mark.parametrize("n", [64, 576, 100])
def test_random_rotations_are_orthogonal_and_seeded(n):
    for make in (lambda s: orthogonal_hadamard(n, seed=s), lambda s: random_orthogonal(n, s)):
        q = make(1)
        torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
        assert torch.equal(q, make(1)) and not torch.equal(q, make(2))
    # the random Hadamard is diag(signs) H / sqrt(n): every entry has magnitude 1/sqrt(n)
    if hadamard_factor(n) is not None:
        q = orthogonal_hadamard(n, seed=1)
        torch.testing.assert_close(q.abs(), torch.full((n, n), 1 / math.sqrt(n), dtype=torch.float64))
        assert torch.equal((q * math.sqrt(n)).abs().round(), torch.ones(n, n, dtype=torch.float64))


def test_fwht_is_sylvester():
    x = torch.randn(3, 5, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fwht(x), x @ sylvester(32), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [8, 12, 64, 576, 1536, 688, 92])
@pytest.mark.parametrize("signed", [False, True])
def test_online_hadamard_equals_the_explicit_matmul(n, signed):
    gen = torch.Generator().manual_seed(n)
    signs = (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).float() if signed else None
    t = OnlineHadamard(n, signs=signs)
    x = torch.randn(2, 7, n, generator=gen)
    m = t.matrix()
    want = (x.double() @ m).float()
    torch.testing.assert_close(t(x), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m @ m.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-6)  # fallback: float32
    if hadamard_factor(n) is not None and not signed:
        torch.testing.assert_close(m * math.sqrt(n), hadamard_matrix(n))


@pytest.mark.parametrize("n", [11008, 14336])
def test_online_hadamard_of_large_widths_is_orthogonal(n):
    t = OnlineHadamard(n)
    x = torch.randn(4, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = t(x)  # fp32 inside
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=0)
    # x H / sqrt(n), applied twice with the transpose, gives x back: (x M) M^T via the kron factors
    hm, p = hadamard_factor(n)
    back = (y.reshape(4, hm.shape[0], p) @ sylvester(p)).transpose(1, 2) @ hm.T
    torch.testing.assert_close(back.transpose(1, 2).reshape(4, n) / math.sqrt(n), x, rtol=0, atol=1e-4)


def test_online_hadamard_dtype_buffers_and_state_dict():
    t = OnlineHadamard(96)
    x = torch.randn(3, 96).to(torch.bfloat16)
    y = t(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), (x.double() @ t.matrix()).float(), rtol=2e-2, atol=2e-2)
    parent = nn.Module()
    parent.t = t
    assert parent.state_dict() == {}  # non-persistent: a model's checkpoint keys do not change
    assert {n for n, _ in parent.named_buffers()} == {"t.hm"}
    with pytest.raises(ValueError, match="width 95"):
        t(torch.randn(2, 95))
