"""The quantization methods' base class and registry (the lifecycle is in `lifecycle.py`).

A method says what to do with one block (`process_block`); the pipeline decides when.
Method-specific keys live under `quant.special` and are validated by the method's own
pydantic model `Special`, so unknown keys there are errors too.
"""

from __future__ import annotations

import difflib
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from llmc.config.loader import explain_validation_error
from llmc.config.schema import ActQuantSection, QuantSection, WeightQuantSection
from llmc.errors import ConfigError
from llmc.methods.lifecycle import CompressionMethod
from llmc.pipeline.blockwise import BlockContext
from llmc.quant.fake_linear import FakeQuantLinear
from llmc.quant.microscaling import NVFP4Quantizer, tie_global_scale
from llmc.quant.registry import Quantizer, build_quantizer

METHODS: dict[str, type[QuantMethod]] = {}


class NoSpecial(BaseModel):
    model_config = ConfigDict(extra="forbid")


class QuantMethod(CompressionMethod):
    """A quantization method: what to do with one block (see `CompressionMethod` for the lifecycle)."""

    Special: ClassVar[type[BaseModel]] = NoSpecial
    float_quant: ClassVar[bool] = False
    """Whether the method works with float formats (float-quant FP8 and FP8 blocks, nvfp4, mxfp4, mxfp8),
    not only integer grids."""
    prefers_quant_out: ClassVar[bool] = False
    """Whether blocks should by default see the quantized earlier blocks' outputs (`quant.quant_out`)."""
    trains_clipping: ClassVar[bool] = False
    """Whether the method trains the weight clipping (`calib_algo: learnable` needs one that does)."""
    tunes_quantized: ClassVar[bool] = False
    """Whether the method tunes a block after it is quantized (NormTweaking): placed after the quantizing
    method of a composition (`method: [GPTQ, NormTweaking]`), it leaves the quantization to that method;
    alone, it quantizes (RTN) and then tunes."""

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
        if floats_used and not self.float_quant:
            floats = ", ".join(sorted(c.name for c in set(METHODS.values()) if c.float_quant))
            kind = " (FP8)" if floats_used[0] == "float-quant" else ""
            raise ConfigError(
                f"{self.name} does not support quant_type: {floats_used[0]}{kind}; use {floats}, or int-quant"
            )
        if quant.weight.calib_algo == "learnable" and final and not self.trains_clipping:
            trainers = ", ".join(sorted(c.name for c in set(METHODS.values()) if c.trains_clipping))
            raise ConfigError(
                f"quant.weight.calib_algo learnable needs a method that trains the clipping ({trainers}); "
                f"{self.name} does not: use minmax, mse or percentile"
            )
        self.weight_quantizer = build_weight_quantizer(quant.weight)
        self.act_quantizer = build_act_quantizer(quant.act) if quant.act is not None else None

    @property
    def arbitrary_group_order(self) -> bool:
        """Whether the quantized columns' groups may not be `j // group_size` (GPTQ act-order's g_idx)."""
        return False

    @property
    def uses_calibration(self) -> bool:
        return self.needs_calibration or (self.quant.act is not None and self.quant.act.static)

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
        wq = self.weight_quantizer
        if isinstance(wq, NVFP4Quantizer):  # one global scale for the linears a serving engine fuses
            fused = next((mods for _, mods in ctx.groups() if name in mods), {})
            wq = tie_global_scale(wq, [m.weight for m in fused.values()])
        return FakeQuantLinear.wrap(
            ctx.block, name, wq, self.act_quantizer,
            act_static=self.quant.act is not None and self.quant.act.static,
        )


    def restore_linear(self, block: nn.Module, name: str, cls: type[FakeQuantLinear]) -> FakeQuantLinear:
        """Re-create block linear `name` as this method left it (class and quantizers), for a resumed
        run; the checkpoint then puts its weights and quantization parameters back."""
        return cls.wrap(block, name, self.weight_quantizer, self.act_quantizer,
                        act_static=self.quant.act is not None and self.quant.act.static)


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
