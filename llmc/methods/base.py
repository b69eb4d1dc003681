"""The quantization methods' base class and registry (the lifecycle is in `lifecycle.py`).

A method says what to do with one block (`process_block`); the pipeline decides when.
Method-specific keys live under `quant.special` and are validated by the method's own
pydantic model `Special`, so unknown keys there are errors too.
"""

from __future__ import annotations

import difflib
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from llmc.config.loader import explain_validation_error
from llmc.config.schema import ActQuantSection, QuantSection, WeightQuantSection
from llmc.errors import ConfigError
from llmc.methods.lifecycle import CompressionMethod
from llmc.pipeline.blockwise import BlockContext
from llmc.pipeline.checkpoint import decode_state, encode_state
from llmc.quant.fake_linear import FakeQuantLinear
from llmc.quant.microscaling import NVFP4Quantizer, tie_global_scale
from llmc.quant.registry import Quantizer, build_quantizer
from llmc.quant.schemes import Scheme, auto_assignable, rtn_errors, scheme_for, solve_auto_scheme

METHODS: dict[str, type[QuantMethod]] = {}


class NoSpecial(BaseModel):
    model_config = ConfigDict(extra="forbid")


class QuantMethod(CompressionMethod):
    """A quantization method: what to do with one block (see `CompressionMethod` for the lifecycle)."""

    Special: ClassVar[type[BaseModel]] = NoSpecial
    float_quant: ClassVar[bool] = False
    """Whether the method works with float formats (float-quant FP8 and FP8 blocks, nvfp4, mxfp4, mxfp8),
    not only integer grids."""
    float_formats: ClassVar[frozenset[str]] = frozenset()
    """The quant_types besides int-quant a method without `float_quant` supports (GPTQ: nvfp4, mxfp4, mxfp8)."""
    float_refusal: ClassVar[str] = ""
    """Why the method refuses the other float formats (added to the error)."""
    prefers_quant_out: ClassVar[bool] = False
    """Whether blocks should by default see the quantized earlier blocks' outputs (`quant.quant_out`)."""
    quantizes_only: ClassVar[bool] = False
    """Whether the method only makes sense as the quantizing method of a composition (it quantizes or trains
    with its own quantizers), never as a transform before another method."""
    trains_clipping: ClassVar[bool] = False
    """Whether the method trains the weight clipping (`calib_algo: learnable` needs one that does)."""
    tunes_quantized: ClassVar[bool] = False
    """Whether the method tunes a block after it is quantized (NormTweaking): placed after the quantizing
    method of a composition (`method: [GPTQ, NormTweaking]`), it leaves the quantization to that method;
    alone, it quantizes (RTN) and then tunes."""
    module_schemes: ClassVar[bool] = False
    """Whether the method quantizes each linear with its own scheme (`quant.overrides`, `quant.auto_scheme`)."""
    zero_points: ClassVar[frozenset[bool]] = frozenset({True})
    """`quant.weight.round_zp` values the method honours: True, integer zero points; False, float ones."""

    def __init__(self, quant: QuantSection, special: dict | None = None, final: bool = True) -> None:
        self.quant = quant
        self.final = final
        """Whether this method leaves the block quantized; earlier methods of a composition only transform."""
        self.stage_seconds: dict[str, float] = {}
        """Wall time of the method's own stages, when it measures them (GPTQ: hessian, solve)."""
        try:
            self.special = self.Special.model_validate(quant.special if special is None else special)
        except ValidationError as exc:
            raise ConfigError(
                f"{self.name}: {explain_validation_error(exc, root=self.Special, prefix='quant.special.')}"
            ) from None
        floats_used = [s.quant_type for s in (quant.weight, quant.act) if s is not None and s.quant_type != "int-quant"]
        floats_used += [p["quant_type"] for o in quant.overrides for p in (o.weight, o.act)
                        if p and p.get("quant_type", "int-quant") != "int-quant"]
        refused = [t for t in floats_used if t not in self.float_formats]
        if refused and not self.float_quant:
            floats = ", ".join(sorted(c.name for c in set(METHODS.values()) if c.float_quant))
            kind = " (FP8)" if refused[0] == "float-quant" else ""
            why = f", as {self.float_refusal}" if self.float_refusal and refused[0] == quant.weight.quant_type else ""
            own = ", ".join(["int-quant", *sorted(self.float_formats)])
            raise ConfigError(
                f"{self.name} does not support quant_type: {refused[0]}{kind}{why}; use {floats}, or {own}"
            )
        if self.quantizes_only and not final:
            raise ConfigError(f"{self.name} quantizes the weights, so it must be the quantizing method of "
                              f"quant.method (the last but tuners, e.g. [SmoothQuant, {self.name}])")
        if quant.weight.calib_algo == "learnable" and final and not self.trains_clipping:
            trainers = ", ".join(sorted(c.name for c in set(METHODS.values()) if c.trains_clipping))
            raise ConfigError(
                f"quant.weight.calib_algo learnable needs a method that trains the clipping ({trainers}); "
                f"{self.name} does not: use minmax, mse or percentile"
            )
        if quant.weight.calib_algo == "learnable" and final and getattr(self.special, "lwc", True) is False:
            raise ConfigError(f"quant.weight.calib_algo learnable needs quant.special.lwc: true for {self.name}; "
                              "set lwc: true or calib_algo: minmax")
        if (quant.overrides or quant.auto_scheme) and final and not self.module_schemes:
            mixed = ", ".join(sorted(c.name for c in set(METHODS.values()) if c.module_schemes))
            raise ConfigError(f"quant.overrides / quant.auto_scheme: {self.name} quantizes every linear with one "
                              f"scheme; use {mixed}, or remove them")
        if quant.weight.round_zp is not None and quant.weight.round_zp not in self.zero_points and final:
            floats = ", ".join(sorted(c.name for c in set(METHODS.values()) if False in c.zero_points))
            raise ConfigError(
                f"quant.weight.round_zp: {str(quant.weight.round_zp).lower()}: {self.name} keeps "
                f"{'float' if True not in self.zero_points else 'integer'} zero points; remove round_zp"
                + (f" (float zero points: {floats})" if quant.weight.round_zp is False else ""))
        self.weight_quantizer = build_weight_quantizer(quant.weight)
        self.act_quantizer = build_act_quantizer(quant.act) if quant.act is not None else None
        self.mixed_precision: dict = {}
        """The automatic assignment (`quant.auto_scheme`): bits per full linear name and what led to it."""
        self._sensitivity: dict[str, dict[str, float]] = {}
        self._params: dict[str, int] = {}
        self._block_index: dict[int, int] = {}
        self._adapter = None
        self._quantizers: dict[tuple, tuple[Quantizer, Quantizer | None]] = {}

    @property
    def arbitrary_group_order(self) -> bool:
        """Whether the quantized columns' groups may not be `j // group_size` (GPTQ act-order's g_idx)."""
        return False

    @property
    def uses_calibration(self) -> bool:
        return (self.needs_calibration or (self.quant.act is not None and self.quant.act.static)
                or (self.final and self.quant.auto_scheme is not None))

    # ---- per-linear schemes (llmc.quant.schemes) ----------------------------------------------

    @property
    def per_module(self) -> bool:
        return bool(self.quant.overrides or self.quant.auto_scheme)

    def bind_model(self, model: nn.Module, adapter) -> None:
        """Know the model's blocks, so a resumed run's `restore_linear(block, ...)` finds each block's schemes."""
        self._block_index = {id(b): i for i, b in enumerate(adapter.get_blocks(model))}
        self._adapter = adapter

    def scheme(self, adapter, block: nn.Module, index: int, name: str) -> Scheme:
        return scheme_for(self.quant, adapter, block, index, name, self.mixed_precision.get("bits"))

    def quantizers_for(self, ctx: BlockContext, name: str) -> tuple[Quantizer, Quantizer | None]:
        """Block linear `name`'s own (weight, act) quantizers: the config's, with overrides and the
        automatic bit width applied."""
        return self._quantizers_of(ctx.adapter, ctx.block, ctx.index, name)

    def _quantizers_of(self, adapter, block: nn.Module, index: int, name: str) -> tuple[Quantizer, Quantizer | None]:
        if not self.per_module:
            return self.weight_quantizer, self.act_quantizer
        s = self.scheme(adapter, block, index, name)
        key = (s.weight.model_dump_json(), s.act.model_dump_json() if s.act is not None else None)
        if key not in self._quantizers:
            self._quantizers[key] = (build_weight_quantizer(s.weight),
                                     build_act_quantizer(s.act) if s.act is not None else None)
        return self._quantizers[key]

    @property
    def wants_statistics_pass(self) -> bool:
        return self.final and self.quant.auto_scheme is not None

    @torch.no_grad()
    def collect_block(self, ctx: BlockContext) -> None:
        """auto_scheme: each assignable target's RTN error at every candidate bit width."""
        from llmc.methods.sparse_base import input_sq_sums

        names = [n for n in ctx.targets if auto_assignable(self.quant, ctx.adapter, ctx.block, ctx.index, n)]
        if not names:
            return
        sums = input_sq_sums(ctx, names)
        for name in names:
            s = scheme_for(self.quant, ctx.adapter, ctx.block, ctx.index, name)
            weight = ctx.block.get_submodule(name).weight.to(ctx.device)
            full = f"{ctx.adapter.blocks}.{ctx.index}.{name}"
            self._sensitivity[full] = rtn_errors(weight, sums.get(name), s.weight, self.quant.auto_scheme.bits)
            self._params[full] = weight.numel()

    def solve_auto_scheme(self) -> None:
        """After the statistics pass: choose the bits per linear (recorded in `mixed_precision`)."""
        if self.quant.auto_scheme is not None and self._params:
            self.mixed_precision = solve_auto_scheme(self.quant, self._params, self._sensitivity)
            self._quantizers.clear()

    def checkpoint_state(self) -> dict:
        state = super().checkpoint_state()
        if self.mixed_precision:
            state["mixed_precision"] = encode_state(self.mixed_precision)
        return state

    def load_checkpoint_state(self, state: dict) -> None:
        super().load_checkpoint_state(state)
        if "mixed_precision" in state:
            self.mixed_precision = decode_state(state["mixed_precision"])
            self._quantizers.clear()

    def export_refusal(self, save_flags: list[str]) -> str | None:
        """Why this method's result cannot be written as the requested `save.*` flags (those set, e.g.
        `["save_trans", "save_vllm"]`), as one error line; None when it can. Checked before calibration."""
        return None

    def wrap_linear(self, ctx: BlockContext, name: str) -> FakeQuantLinear | None:
        """Replace block linear `name` by a fake-quant linear with this config's quantizers.

        A method that is not the last of a composition leaves the linear in float (None).
        """
        if not self.final:
            return None
        wq, aq = self.quantizers_for(ctx, name)
        if isinstance(wq, NVFP4Quantizer):  # one global scale for the linears a serving engine fuses
            fused = next((mods for _, mods in ctx.groups() if name in mods), {})
            wq = tie_global_scale(wq, [m.weight for m in fused.values()])
        return FakeQuantLinear.wrap(ctx.block, name, wq, aq, act_static=self.act_static(ctx.adapter, ctx.block,
                                                                                         ctx.index, name))

    def act_static(self, adapter, block: nn.Module, index: int, name: str) -> bool:
        act = self.scheme(adapter, block, index, name).act if self.per_module else self.quant.act
        return act is not None and act.static


    def restore_linear(self, block: nn.Module, name: str, cls: type[FakeQuantLinear]) -> FakeQuantLinear:
        """Re-create block linear `name` as this method left it (class and quantizers), for a resumed
        run; the checkpoint then puts its weights and quantization parameters back."""
        if not self.per_module:
            return cls.wrap(block, name, self.weight_quantizer, self.act_quantizer,
                            act_static=self.quant.act is not None and self.quant.act.static)
        index = self._block_index[id(block)]
        wq, aq = self._quantizers_of(self._adapter, block, index, name)
        return cls.wrap(block, name, wq, aq, act_static=self.act_static(self._adapter, block, index, name))


def build_weight_quantizer(w: WeightQuantSection) -> Quantizer:
    """The weight quantizer of a config (by its quant_type, `llmc.quant.registry`)."""
    return build_quantizer(w, "weight")


def build_act_quantizer(a: ActQuantSection) -> Quantizer:
    return build_quantizer(a, "act")


def register_method(cls: type[QuantMethod]) -> type[QuantMethod]:
    for key in (cls.name, *cls.aliases):
        METHODS[key.lower()] = cls
    return cls


def method_class(name: str) -> type[QuantMethod]:
    cls = METHODS.get(name.lower())
    if cls is None:
        names = sorted({c.name for c in METHODS.values()} | {a for c in METHODS.values() for a in c.aliases})
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"unknown quant.method {name!r}; {hint}available: {', '.join(names)}")
    return cls


def quantizing_index(classes: list[type[QuantMethod]]) -> int:
    """Which method of a composition quantizes: the last one that is not a tuner (`tunes_quantized`),
    which may only come after it; with tuners alone, the last tuner."""
    plain = [i for i, c in enumerate(classes) if not c.tunes_quantized]
    if not plain:
        return len(classes) - 1
    last = plain[-1]
    early = [c.name for c in classes[:last] if c.tunes_quantized]
    if early:
        raise ConfigError(
            f"quant.method: {early[0]} tunes a quantized block, so it must come after {classes[last].name} "
            f"(e.g. [{classes[last].name}, {early[0]}])"
        )
    return last


def get_methods(quant: QuantSection) -> list[QuantMethod]:
    """The configured methods in order; one of them quantizes (`quantizing_index`), those before it
    transform, those after it tune the quantized block."""
    names = quant.methods
    classes = [method_class(n) for n in names]
    if len(names) == 1:
        return [classes[0](quant)]
    final = quantizing_index(classes)
    keys = {k.lower(): k for k in quant.special}
    known = {n.lower() for n in names} | {k.lower() for c in classes for k in (c.name, *c.aliases)}
    for key in keys:
        if key not in known:
            raise ConfigError(
                f"quant.special.{keys[key]}: with several methods, special is keyed by method name; "
                f"use one of {', '.join(names)}"
            )
    methods = []
    for i, cls in enumerate(classes):
        match = [keys[k] for k in keys if method_class(k) is cls] if keys else []
        special = quant.special[match[0]] if match else {}
        methods.append(cls(quant, special=special or {}, final=i == final))
    return methods


def get_method(quant: QuantSection) -> QuantMethod:
    """The quantizing method of the configuration (the only one, or the one of a composition that quantizes)."""
    return next(m for m in get_methods(quant) if m.final)
