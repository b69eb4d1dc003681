"""Learnable affine transforms of a linear's input: FlatQuant's Kronecker-factored matrices.

Sun et al., 2024, "FlatQuant: Flatness Matters for LLM Quantization" (arXiv:2410.09426), Sec. 3.1:
a linear `y = x W^T` is rewritten as `y = (x P)(W P^{-T})^T` with an invertible `P`, learned so
that both `x P` and `W P^{-T}` quantize well. `P` is a Kronecker product `P1 (x) P2` of two small
matrices whose sizes multiply to the input width, with sizes as close to square as possible
(`kron_factors`: 576 = 24 * 24, 1536 = 32 * 48, 4096 = 64 * 64), so `x P` costs two small matmuls:
the input reshaped to `[..., n1, n2]` becomes `P1^T X P2`. A learnable per-channel scale `d`
(the paper's `diag_scale`) multiplies the input first: `x -> (x * d) P`, `W -> W diag(1/d) P^{-T}`.

`KroneckerAffine` is a `FakeQuantLinear.input_transform`. While trained it holds parameters in one
of the paper's two forms: SVD (default), `P_i = U_i diag(s_i) V_i^T` with orthogonal `U_i`, `V_i`
(a random orthogonal start times the Cayley map of a learned skew matrix), whose inverse
`U_i diag(1/s_i) V_i^T` needs no matrix inversion; or direct (`direct_inv`), `P_i` itself, inverted
by `torch.linalg.inv`. `freeze()` keeps `P1`, `P2` and `d` as float32 buffers (persistent, so a
resume checkpoint stores them for every linear that shares the module) and drops the parameters;
`merge_weight` then computes the exact inverse of those float32 buffers in float64. The transform
always computes in float32, with autocast off.

Training (FlatQuant's, per block) is written for few operators per step, since a step of a model
of SmolLM2's size is bound by kernel launches on a GPU, not by arithmetic: `training_step(transforms)`
computes the matrices and inverses of all the block's transforms once per step, the factors of one
size and form together in one batched solve, with the `_ex` solvers (no host sync per solve; a
singular matrix shows as NaN in the loss); `TrainedBlock` computes, per step, the transformed and
fake-quantized weights of all the block's linears of one input width together, and each group's
transformed and fake-quantized input once for all its linears. These are the functions
`FakeQuantLinear` computes with the transform as its `input_transform` (same values, the gradients
up to floating-point order; tests/test_flatquant.py compares them).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmc.quant.fake_linear import FakeQuantLinear
from llmc.quant.observers import LearnableClip
from llmc.quant.quantizer import IntQuantizer


def kron_factors(n: int) -> tuple[int, int]:
    """`(n1, n2)` with `n1 * n2 = n`, `n1 <= n2` and `n1` the largest divisor of n not above sqrt(n)."""
    n1 = math.isqrt(n)
    while n % n1:
        n1 -= 1
    return n1, n // n1


def kron_matmul(x: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """`x (left (x) right)` for rows of `x` (`[..., n1 * n2]`), as `left^T X right` per row."""
    shape = x.shape
    x = x.reshape(-1, left.shape[0], right.shape[0])
    return torch.matmul(left.T, torch.matmul(x, right)).reshape(shape)


def random_orthogonal(n: int, generator: torch.Generator) -> Tensor:
    """A Haar-random orthogonal `[n, n]` float64 matrix (QR of a Gaussian, signs fixed), on the CPU."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).masked_fill(torch.diagonal(r) == 0, 1.0)


def _float32(x: Tensor) -> contextlib.AbstractContextManager:
    """No autocast: the transforms are computed in float32 even inside bf16 training."""
    return torch.autocast(x.device.type, enabled=False)


class _Factor(nn.Module):
    """One Kronecker factor `P_i` while it is trained: SVD form or direct."""

    def __init__(self, n: int, direct_inv: bool, generator: torch.Generator, device: torch.device | None
                 ) -> None:
        super().__init__()
        self.n, self.direct_inv = n, direct_inv
        if direct_inv:
            self.matrix = nn.Parameter(random_orthogonal(n, generator).float().to(device))
            return
        self.register_buffer("u0", random_orthogonal(n, generator).float().to(device))
        self.register_buffer("v0", random_orthogonal(n, generator).float().to(device))
        self.skew_u = nn.Parameter(torch.zeros(n, n, device=device))
        self.skew_v = nn.Parameter(torch.zeros(n, n, device=device))
        self.singular = nn.Parameter(torch.ones(n, device=device))

    def matrix_and_inverse_t(self, inverse: bool = True) -> tuple[Tensor, Tensor | None]:
        """`P_i` and, when asked, `P_i^{-T}` (float32, differentiable)."""
        (matrix,), (inverse_t,) = factor_matrices([self], inverse)
        return matrix, inverse_t


def factor_matrices(factors: list[_Factor], inverse: bool = True) -> tuple[list[Tensor], list[Tensor | None]]:
    """`P_i` and (when asked) `P_i^{-T}` of factors of one size and form, computed batched."""
    if factors[0].direct_inv:
        matrices = torch.stack([f.matrix for f in factors])
        inv_t = torch.linalg.inv_ex(matrices)[0].transpose(-1, -2) if inverse else None
    else:
        k = len(factors)
        skew = torch.stack([f.skew_u for f in factors] + [f.skew_v for f in factors])
        base = torch.stack([f.u0 for f in factors] + [f.v0 for f in factors])
        a = skew - skew.transpose(-1, -2)
        eye = torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
        orth = base @ torch.linalg.solve_ex(eye + a, eye - a)[0]  # Cayley map: orthogonal for any skew `a`
        u, v_t = orth[:k], orth[k:].transpose(-1, -2)
        singular = torch.stack([f.singular for f in factors]).unsqueeze(-2)
        matrices = (u * singular) @ v_t
        inv_t = (u / singular) @ v_t if inverse else None
    return list(matrices.unbind()), list(inv_t.unbind()) if inverse else [None] * len(factors)


@contextlib.contextmanager
def training_step(transforms: list[KroneckerAffine]) -> Iterator[None]:
    """One training step's forward (its backward may run after): the matrices and inverses of all
    `transforms` are computed here once, batched by factor size and form, and shared by every use."""
    by_kind: dict[tuple[int, bool], list[_Factor]] = {}
    for t in transforms:
        for f in t.factors:
            by_kind.setdefault((f.n, f.direct_inv), []).append(f)
    computed: dict[int, tuple[Tensor, Tensor]] = {}
    with torch.autocast(next(transforms[0].parameters()).device.type, enabled=False):
        for factors in by_kind.values():
            for f, m, m_it in zip(factors, *factor_matrices(factors)):
                computed[id(f)] = (m, m_it)
    for t in transforms:
        (left, left_it), (right, right_it) = (computed[id(f)] for f in t.factors)
        t.__dict__["_step_cache"] = (left, right, left_it, right_it)
    try:
        yield
    finally:
        for t in transforms:
            t.__dict__["_step_cache"] = None


class KroneckerAffine(nn.Module):
    """`x -> (x * d)(P1 (x) P2)` on the last dimension, in float32 (see the module docstring)."""

    def __init__(
        self, features: int, *, diag: Tensor | None = None, add_diag: bool = True, direct_inv: bool = False,
        generator: torch.Generator | None = None, device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.features = features
        n1, n2 = kron_factors(features)
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        self.factors: nn.ModuleList | None = nn.ModuleList(
            [_Factor(n1, direct_inv, gen, device), _Factor(n2, direct_inv, gen, device)]
        )
        self.diag_scale: nn.Parameter | None = None
        if add_diag:
            init = torch.ones(features) if diag is None else diag.detach().float()
            self.diag_scale = nn.Parameter(init.to(device))

    @classmethod
    def frozen(cls, features: int, add_diag: bool, device: torch.device | None = None) -> KroneckerAffine:
        """An identity transform in its frozen form, with buffers of the shapes a trained one has
        (for a resumed run, which then loads the trained values into them)."""
        t = cls.__new__(cls)
        nn.Module.__init__(t)
        t.features, t.factors, t.diag_scale = features, None, None
        n1, n2 = kron_factors(features)
        t.register_buffer("left", torch.eye(n1, device=device))
        t.register_buffer("right", torch.eye(n2, device=device))
        t.register_buffer("scale", torch.ones(features, device=device) if add_diag else None)
        return t

    @property
    def is_frozen(self) -> bool:
        return self.factors is None

    def matrix_parameters(self) -> list[nn.Parameter]:
        return [] if self.factors is None else list(self.factors.parameters())

    def _matrices(self, inverse: bool) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        cache = self.__dict__.get("_step_cache")
        if cache is not None:
            return cache
        (left, left_it), (right, right_it) = (f.matrix_and_inverse_t(inverse) for f in self.factors)
        return left, right, left_it, right_it

    def forward(self, x: Tensor) -> Tensor:
        with _float32(x):
            y = x.float()
            if self.is_frozen:
                if self.scale is not None:
                    y = y * self.scale
                return kron_matmul(y, self.left, self.right).to(x.dtype)
            if self.diag_scale is not None:
                y = y * self.diag_scale
            left, right, _, _ = self._matrices(inverse=False)
            return kron_matmul(y, left, right).to(x.dtype)

    def transform_weight(self, weight: Tensor) -> Tensor:
        """`W diag(1/d) P^{-T}` while training (float32, differentiable), in the weight's dtype."""
        with _float32(weight):
            w = weight.float()
            if self.diag_scale is not None:
                w = w / self.diag_scale
            _, _, left_it, right_it = self._matrices(inverse=True)
            return kron_matmul(w, left_it, right_it).to(weight.dtype)

    @torch.no_grad()
    def freeze(self) -> None:
        """Keep the trained `P1`, `P2` and `d` as float32 buffers; drop the training parameters."""
        if self.is_frozen:
            return
        left, right, _, _ = self._matrices(inverse=False)
        scale = self.diag_scale.detach().clone() if self.diag_scale is not None else None
        del self.factors, self.diag_scale
        self.factors, self.diag_scale = None, None
        self.register_buffer("left", left.detach().float().clone())
        self.register_buffer("right", right.detach().float().clone())
        self.register_buffer("scale", scale)

    @torch.no_grad()
    def merge_weight(self, weight: Tensor) -> Tensor:
        """`W diag(1/d) P^{-T}` for the frozen buffers, in float64 (exact up to the weight's dtype)."""
        if not self.is_frozen:
            raise RuntimeError("merge_weight needs a frozen transform (call freeze() first)")
        w = weight.double()
        if self.scale is not None:
            w = w / self.scale.double()
        left_it = torch.linalg.inv(self.left.double()).T
        right_it = torch.linalg.inv(self.right.double()).T
        return kron_matmul(w, left_it, right_it).to(weight.dtype)

    def extra_repr(self) -> str:
        n1, n2 = kron_factors(self.features)
        diag = (self.scale if self.is_frozen else self.diag_scale) is not None
        return f"features={self.features} ({n1} x {n2}), diag={diag}, frozen={self.is_frozen}"


# ---- training a block's transformed linears (FlatQuant) ------------------------------------------


class _Clip:
    """Logits laid out as a `LearnableClip`'s, for its formula applied to several clips at once."""

    def __init__(self, upper: Tensor, lower: Tensor) -> None:
        self.upper, self.lower = upper, lower


def _clipped_fake_quant(quantizer: IntQuantizer, x: Tensor, clip: _Clip | LearnableClip) -> Tensor:
    """`x` fake-quantized with the learned clipping of its rows' ranges (`FakeQuantLinear.fake_weight`)."""
    scale, zero = quantizer.params_from_range(*LearnableClip.forward(clip, quantizer.rows(x).float()))
    return quantizer.quant_dequant(x, scale, zero)


class _TrainedGroup:
    """A group of linears sharing one transform, while it trains: per step, its input is transformed
    and fake-quantized once for all its linears (their clippings stacked, per_token), and each
    linear's forward (`_forward`) picks its share and its weight of the step (`TrainedBlock`)."""

    def __init__(self, transform: KroneckerAffine, linears: list[FakeQuantLinear]) -> None:
        self.transform, self.linears = transform, linears
        aq = linears[0].act_quantizer
        self.share_input = all(fq.input_transform is transform and fq.act_quantizer == aq for fq in linears)
        self.stack_acts = (self.share_input and aq is not None and aq.granularity == "per_token"
                           and all(fq.act_clip is not None for fq in linears))
        self.weights: list[Tensor] = []
        self._inputs: tuple[Tensor, list[Tensor]] | None = None

    def _quantized_inputs(self, y: Tensor) -> list[Tensor]:
        if not self.stack_acts:
            if all(m.act_clip is None for m in self.linears):  # the same for all
                return [self.linears[0].quantize_input(y)] * len(self.linears)
            return [m.quantize_input(y) for m in self.linears]
        aq = self.linears[0].act_quantizer
        clip = _Clip(*(torch.stack([getattr(m.act_clip, n) for m in self.linears]) for n in ("upper", "lower")))
        scale, zero = aq.params_from_range(*LearnableClip.forward(clip, aq.rows(y).float()))  # [k, tokens, 1]
        stacked = y.unsqueeze(0).expand(len(self.linears), *y.shape)
        return list(aq.quant_dequant(stacked, scale.reshape(-1, 1), zero.reshape(-1, 1)).unbind())

    def _forward(self, index: int, x: Tensor) -> Tensor:
        fq = self.linears[index]
        if not self.share_input:
            xq = fq.quantize_input(fq.input_transform(x))
        else:
            if self._inputs is None or self._inputs[0] is not x:
                self._inputs = (x, self._quantized_inputs(self.transform(x)))
            xq = self._inputs[1][index]
        return F.linear(xq, self.weights[index], fq.bias)


class TrainedBlock:
    """The block's groups while they train. Per step every linear's weight is transformed (a group's
    linears at once) and fake-quantized with its learned clipping, all the block's linears of one
    input width and quantizer together (rows of their weights stacked; not per_tensor, whose one
    row is the whole weight). The functions of `FakeQuantLinear` with the transform inside, in fewer
    operators: a training step is launch-bound on a GPU."""

    def __init__(self, groups: list[tuple[KroneckerAffine, list[FakeQuantLinear]]]) -> None:
        self.groups = [_TrainedGroup(t, fqs) for t, fqs in groups]
        self.buckets: dict[tuple | None, list[_TrainedGroup]] = {}
        self.float_weights: dict[int, Tensor] = {}
        for g in self.groups:
            fq = g.linears[0]
            wq = fq.weight_quantizer
            same = all(m.weight_quantizer == wq and m.weight.dtype == fq.weight.dtype for m in g.linears)
            key = (wq, fq.in_features, fq.weight.dtype) if same and wq.granularity != "per_tensor" else None
            self.buckets.setdefault(key, []).append(g)
            if key is not None:
                self.float_weights[id(g)] = torch.cat([m.weight.detach() for m in g.linears])

    def __enter__(self) -> TrainedBlock:
        for g in self.groups:
            for index, fq in enumerate(g.linears):
                fq.forward = functools.partial(g._forward, index)
        return self

    def __exit__(self, *exc: object) -> None:
        for g in self.groups:
            for fq in g.linears:
                del fq.forward

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """One training step's forward: the weights are computed on entry, the caches dropped on exit."""
        self._step_weights()
        try:
            yield
        finally:
            for g in self.groups:
                g.weights, g._inputs = [], None

    def _step_weights(self) -> None:
        for key, groups in self.buckets.items():
            if key is None:
                for g in groups:
                    g.weights = [_clipped_fake_quant(fq.weight_quantizer, g.transform.transform_weight(fq.weight),
                                                     fq.weight_clip) for fq in g.linears]
                continue
            linears = [fq for g in groups for fq in g.linears]
            weight = torch.cat([g.transform.transform_weight(self.float_weights[id(g)]) for g in groups])
            clip = _Clip(*(torch.cat([getattr(fq.weight_clip, n) for fq in linears]) for n in ("upper", "lower")))
            weights = iter(_clipped_fake_quant(key[0], weight, clip).split([fq.out_features for fq in linears]))
            for g in groups:
                g.weights = [next(weights) for _ in g.linears]
