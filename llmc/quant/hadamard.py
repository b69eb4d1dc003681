"""Hadamard matrices of the orders LLM widths have, and an online Hadamard transform module.

A Hadamard matrix H of order n has entries +-1 and H H^T = n I, so H / sqrt(n) is orthogonal and
spreads any single large coordinate evenly over all n (QuaRot, arXiv:2404.00456; QuIP#). Orders
n = m * 2^k are built as H_m kron S_{2^k}, with S Sylvester's matrix (S_2 = [[1, 1], [1, -1]],
symmetric, applied in O(n log n) by the Walsh-Hadamard butterfly) and H_m one of:

- m = 1 (pure powers of two);
- Paley I, m = q + 1 with q a prime power, q = 3 (mod 4): I + [[0, j^T], [-j, Q]];
- Paley II, m = 2(q + 1) with q a prime power, q = 1 (mod 4): I kron [[1, -1], [-1, -1]] +
  C kron [[1, 1], [1, -1]] with the symmetric conference matrix C = [[0, j^T], [j, Q]];

where Q is the Jacobsthal matrix Q[a, b] = chi(a - b) of GF(q) (chi the quadratic character).
The smallest such m is used: 576 = 36 * 16, 1536 = 12 * 128, 11008 = 344 * 32 (GF(7^3)),
14336 = 28 * 512 (GF(3^3)), 18944 = 148 * 128. Orders with none (92, or n = 2 mod 4 beyond 2)
fall back to a seeded random orthogonal matrix, logged.

Conventions: a transform acts on row vectors, `x @ M`. A random Hadamard rotation is
`diag(s) H / sqrt(n)` with seeded random signs s (the signs act on the input first).
"""

from __future__ import annotations

import functools
import itertools
import logging
import math

import numpy as np
import torch
from torch import Tensor, nn

log = logging.getLogger("llmc")


# ---- finite fields and Paley constructions ------------------------------------------------------

def prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p**k, p prime; None if q is not a prime power."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    k, rest = 0, q
    while rest % p == 0:
        rest //= p
        k += 1
    return (p, k) if rest == 1 else None


def _poly_mod(a: list[int], f: list[int], p: int) -> list[int]:
    """a mod f over GF(p); coefficient lists, lowest degree first, f monic."""
    a = [c % p for c in a]
    while len(a) >= len(f):
        lead = a[-1]
        if lead:
            shift = len(a) - len(f)
            for i, c in enumerate(f):
                a[shift + i] = (a[shift + i] - lead * c) % p
        a.pop()
    return a


def _irreducible(p: int, k: int) -> list[int]:
    """A monic irreducible polynomial of degree k over GF(p): one with no monic factor of degree <= k/2."""
    for tail in itertools.product(range(p), repeat=k):
        f = [*tail, 1]
        if f[0] == 0:
            continue
        factors = (list(t) + [1] for d in range(1, k // 2 + 1) for t in itertools.product(range(p), repeat=d))
        if all(any(_poly_mod(f, g, p)) for g in factors):
            return f
    raise ValueError(f"no irreducible polynomial of degree {k} over GF({p})")


def quadratic_character(q: int) -> np.ndarray:
    """chi over GF(q), elements indexed by their base-p digits (coefficients): 0, 1 (square) or -1."""
    p, k = prime_power(q)
    chi = -np.ones(q, dtype=np.int64)
    chi[0] = 0
    if k == 1:
        chi[(np.arange(1, q) ** 2) % q] = 1
        return chi
    f = _irreducible(p, k)
    for x in range(1, q):
        digits = [(x // p**i) % p for i in range(k)]
        square = [0] * (2 * k - 1)
        for i, a in enumerate(digits):
            for j, b in enumerate(digits):
                square[i + j] += a * b
        rem = _poly_mod(square, f, p) + [0] * k
        chi[sum(c * p**i for i, c in enumerate(rem[:k]))] = 1
    return chi


def jacobsthal(q: int) -> np.ndarray:
    """Q[a, b] = chi(a - b) over GF(q) (subtraction is digit-wise mod p)."""
    p, k = prime_power(q)
    digits = (np.arange(q)[:, None] // p ** np.arange(k)[None, :]) % p
    diff = (digits[:, None, :] - digits[None, :, :]) % p
    return quadratic_character(q)[diff @ (p ** np.arange(k))]


def paley1(q: int) -> np.ndarray:
    n = q + 1
    s = np.zeros((n, n), dtype=np.int64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, jacobsthal(q)
    return np.eye(n, dtype=np.int64) + s


def paley2(q: int) -> np.ndarray:
    n = q + 1
    c = np.zeros((n, n), dtype=np.int64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, jacobsthal(q)
    return np.kron(np.eye(n, dtype=np.int64), [[1, -1], [-1, -1]]) + np.kron(c, [[1, 1], [1, -1]])


def _base(m: int) -> np.ndarray | None:
    """A Hadamard matrix of order m from the constructions above (m = 1, Paley I or II), or None."""
    if m == 1:
        return np.ones((1, 1), dtype=np.int64)
    if m == 2:
        return np.array([[1, 1], [1, -1]], dtype=np.int64)
    if m % 4:
        return None
    pk = prime_power(m - 1)
    if pk is not None and (m - 1) % 4 == 3:
        return paley1(m - 1)
    pk = prime_power(m // 2 - 1)
    if pk is not None and (m // 2 - 1) % 4 == 1:
        return paley2(m // 2 - 1)
    return None


@functools.lru_cache(maxsize=64)
def _factor(n: int) -> tuple[np.ndarray, int] | None:
    k = (n & -n).bit_length() - 1
    for j in range(k, -1, -1):  # the largest power of two first: the smallest dense part
        base = _base(n >> j)
        if base is not None:
            base.setflags(write=False)
            return base, 1 << j
    return None


def hadamard_factor(n: int) -> tuple[Tensor, int] | None:
    """(H_m as float64 +-1, 2^k) with H_n = H_m kron Sylvester(2^k) and m smallest; None: no construction."""
    if n < 1:
        raise ValueError(f"Hadamard order must be positive, got {n}")
    found = _factor(n)
    return None if found is None else (torch.from_numpy(found[0].astype(np.float64)), found[1])


def sylvester(n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """The +-1 Hadamard matrix H_m kron Sylvester(2^k) of order n (ValueError when none is built)."""
    factor = hadamard_factor(n)
    if factor is None:
        raise ValueError(f"no Hadamard construction of order {n}")
    hm, p = factor
    return torch.kron(hm, sylvester(p)).to(dtype)


def random_signs(n: int, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64).to(torch.float64) * 2 - 1


def random_orthogonal(n: int, seed: int) -> Tensor:
    """A seeded random orthogonal matrix (QR of a Gaussian, signs fixed so it is Haar-distributed), float64."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def orthogonal_hadamard(n: int, seed: int | None = None) -> Tensor:
    """H / sqrt(n) (seed given: diag(random signs) H / sqrt(n)), float64; a seeded random orthogonal
    matrix where no Hadamard construction of order n exists (logged)."""
    if hadamard_factor(n) is None:
        log.warning("no Hadamard matrix of order %d is constructed here; using a seeded random orthogonal matrix", n)
        return random_orthogonal(n, 0 if seed is None else seed)
    h = hadamard_matrix(n) / math.sqrt(n)
    return h if seed is None else random_signs(n, seed)[:, None] * h


# ---- the transform ------------------------------------------------------------------------------

def fwht(x: Tensor) -> Tensor:
    """x @ Sylvester(p) along the last dimension (p a power of two), unnormalized, by the butterfly."""
    shape, p = x.shape, x.shape[-1]
    x = x.reshape(-1, p)
    h = 1
    while h < p:
        x = x.view(-1, p // (2 * h), 2, h)
        a, b = x[:, :, 0, :], x[:, :, 1, :]
        x = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return x.reshape(shape)


@functools.cache
def _fast_kernel():
    try:
        from fast_hadamard_transform import hadamard_transform
    except ImportError:
        return None
    return hadamard_transform


class OnlineHadamard(nn.Module):
    """`x -> (x * signs) @ H / sqrt(n)` along the last dimension, computed in float32 (`fp32`) and cast
    back; a seeded random orthogonal matrix where no Hadamard matrix of order n is built. The
    Sylvester part runs through the `fast_hadamard_transform` CUDA kernel when it is installed and
    the input is on CUDA, else the torch butterfly; the H_m part is a small matmul. Buffers are not
    persistent: a model's state_dict keys do not change."""

    def __init__(self, n: int, signs: Tensor | None = None, fp32: bool = True, seed: int = 0) -> None:
        super().__init__()
        self.n, self.fp32 = n, fp32
        factor = hadamard_factor(n)
        self.hadamard = factor is not None
        if factor is None:
            log.warning("no Hadamard matrix of order %d is constructed here; the online transform uses a "
                        "seeded random orthogonal matrix", n)
            self.m, self.p = n, 1
            dense = random_orthogonal(n, seed) * math.sqrt(n)
        else:
            dense, self.p = factor
            self.m = dense.shape[0]
        self.register_buffer("hm", dense.to(torch.float32).clone(), persistent=False)
        self.register_buffer("signs", None if signs is None else signs.to(torch.float32).clone(), persistent=False)

    def matrix(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """The n x n matrix M with forward(x) = x @ M (orthogonal)."""
        dense = torch.kron(self.hm.double().cpu(), sylvester(self.p)) / math.sqrt(self.n)
        if self.signs is not None:
            dense = self.signs.double().cpu()[:, None] * dense
        return dense.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.n:
            raise ValueError(f"OnlineHadamard of order {self.n} got inputs of width {x.shape[-1]}")
        dtype = x.dtype
        h = x.float() if self.fp32 else x
        if self.signs is not None:
            h = h * self.signs.to(h.dtype)
        shape = h.shape
        h = h.reshape(-1, self.m, self.p)
        if self.p > 1:
            kernel = _fast_kernel() if h.is_cuda else None
            h = kernel(h.contiguous(), 1.0) if kernel is not None else fwht(h)
        if self.m > 1:
            h = torch.matmul(self.hm.to(h.dtype).t(), h)
        return (h.reshape(shape) * (1.0 / math.sqrt(self.n))).to(dtype)

    def extra_repr(self) -> str:
        kind = f"H{self.m} x H{self.p}" if self.hadamard else "random orthogonal"
        return f"n={self.n}, {kind}{', signs' if self.signs is not None else ''}{', fp32' if self.fp32 else ''}"
