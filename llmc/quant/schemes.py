"""Mixed precision: each target linear's own scheme, from `quant.overrides` and `quant.auto_scheme`.

`quant.overrides` (the list form of llmc's `mix_bits` settings) selects linears by `regex` (full match
on the block-relative name `mlp.down_proj` or the full name `model.layers.3.mlp.down_proj`), adapter
`role` (attn_in, attn_out, mlp_in, mlp_out) and/or `blocks` (ids like `ignored_layers.block_ids`);
every selector given must match. Matching entries apply in order: their `weight` / `act` keys merge
over the scheme so far (first `quant.weight` / `quant.act`), `do_quant: false` leaves the linear in float.

```yaml
quant:
    method: GPTQ
    weight: {bit: 4, group_size: 128}
    overrides:
        - {role: mlp_out, blocks: [0, '30-31'], weight: {bit: 8}}
        - {regex: 'self_attn\\.o_proj', do_quant: false}
    auto_scheme: {bits_per_weight: 3.5, bits: [3, 4]}
```

`quant.auto_scheme` chooses each linear's weight bit width (what AutoRound's auto-scheme and
ModelOpt's AutoQuantize do) from a statistics pass over the float model before any block is
compressed. Sensitivity of linear W at b bits: the RTN output error on the calibration inputs X,
approximated with the diagonal of the layer Hessian X^T X as in OBQ/GPTQ
(sum_ij (W - Q_b(W))_ij^2 * sum_t x_tj^2); the Hessian-weighted layer sensitivity follows HAWQ-V2
(Dong et al., 2020, "HAWQ-V2: Hessian Aware trace-Weighted Quantization of Neural Networks",
arXiv:1911.03852). All linears start at the smallest candidate; greedily, the upgrade to the next
candidate with the largest error drop per added bit that still fits is taken, until none fits.
Bits per weight = the parameter-weighted mean of the weight code bits over the assigned linears (group
scales and zeros not counted: they cost the same at every candidate, 32 / group_size bits with fp16
scale and zero); linears an override gives `bit` or `quant_type`, or leaves in float, are not assigned.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ValidationError
from torch import Tensor, nn

from llmc.config.schema import ActQuantSection, QuantSection, SchemeOverride, WeightQuantSection
from llmc.errors import ConfigError


@dataclass(frozen=True)
class Scheme:
    """One linear's quantization: its weight and activation sections, or float (`quantized` false)."""

    weight: WeightQuantSection
    act: ActQuantSection | None
    quantized: bool = True


def merge_section(base: BaseModel | None, partial: dict[str, Any], cls: type[BaseModel]) -> Any:
    """`partial` keys over the keys `base` was given (so a format's implied keys still follow it)."""
    data = base.model_dump(exclude_unset=True) if base is not None else {}
    return cls.model_validate({**data, **partial})


def _explain(exc: ValidationError, cls: type[BaseModel], where: str) -> str:
    from llmc.config.loader import explain_validation_error

    text = explain_validation_error(exc, root=cls, prefix=where + ".")
    return text if exc.errors()[0]["loc"] else f"{where}: {text}"


def check_override_schemes(quant: QuantSection) -> None:
    """Each override's merged scheme is valid (ValueError naming the override index otherwise)."""
    for i, o in enumerate(quant.overrides):
        for key, base, cls in (("weight", quant.weight, WeightQuantSection), ("act", quant.act, ActQuantSection)):
            partial = getattr(o, key)
            if partial is None:
                continue
            try:
                merge_section(base, partial, cls)
            except ValidationError as exc:
                raise ValueError(_explain(exc, cls, f"overrides[{i}].{key}")) from None
    if quant.auto_scheme is not None and quant.weight.quant_type != "int-quant":
        raise ValueError(f"auto_scheme chooses integer bit widths, not {quant.weight.quant_type}; "
                         "set quant.weight.quant_type: int-quant or remove auto_scheme")


def role_names(adapter: Any, block: nn.Module, role: str) -> set[str]:
    from llmc.models.adapter import expand_name

    roles = adapter.block_roles
    if roles is None:
        return set()
    return {n for pattern in getattr(roles, role) for n in expand_name(pattern, block)}


def matches(o: SchemeOverride, adapter: Any, block: nn.Module, index: int, name: str) -> bool:
    blocks = o.block_set()
    if blocks is not None and index not in blocks:
        return False
    if o.role is not None and name not in role_names(adapter, block, o.role):
        return False
    if o.regex is not None:
        full = f"{adapter.blocks}.{index}.{name}"
        return bool(re.fullmatch(o.regex, name) or re.fullmatch(o.regex, full))
    return True


def scheme_for(quant: QuantSection, adapter: Any, block: nn.Module, index: int, name: str,
               auto_bits: dict[str, int] | None = None) -> Scheme:
    """Linear `name` of block `index`: the automatic bit width (if assigned), then the matching overrides."""
    weight, act, quantized = quant.weight, quant.act, True
    bit = (auto_bits or {}).get(f"{adapter.blocks}.{index}.{name}")
    if bit is not None:
        weight = merge_section(weight, {"bit": bit}, WeightQuantSection)
    for o in quant.overrides:
        if not matches(o, adapter, block, index, name):
            continue
        if not o.do_quant:
            quantized = False
        if o.weight is not None:
            weight = merge_section(weight, o.weight, WeightQuantSection)
        if o.act is not None:
            act = merge_section(act, o.act, ActQuantSection)
    return Scheme(weight, act, quantized)


def is_float(quant: QuantSection | None, adapter: Any, block: nn.Module, index: int, name: str) -> bool:
    """Whether an override leaves the linear in float (`do_quant: false`)."""
    return quant is not None and any(
        not o.do_quant and matches(o, adapter, block, index, name) for o in quant.overrides
    )


def auto_assignable(quant: QuantSection, adapter: Any, block: nn.Module, index: int, name: str) -> bool:
    """Whether `auto_scheme` chooses this linear's bits: no matching override fixes its bits or format."""
    for o in quant.overrides:
        if matches(o, adapter, block, index, name):
            if not o.do_quant or (o.weight and ({"bit", "quant_type"} & set(o.weight))):
                return False
    return True


def check_overrides(quant: QuantSection | None, model: nn.Module, adapter: Any) -> None:
    """Every override selects some linear of the loaded model (one error line naming the override)."""
    if quant is None or not quant.overrides:
        return
    blocks = adapter.get_blocks(model)
    floats = [set(adapter.block_float_linears(b)) for b in blocks]
    names = [[n for n in adapter.block_linear_names(b) if n not in floats[i]] for i, b in enumerate(blocks)]
    for k, o in enumerate(quant.overrides):
        where = f"quant.overrides[{k}]"
        if o.blocks is not None and max(o.block_set()) >= len(blocks):
            raise ConfigError(f"{where}.blocks: {max(o.block_set())} is beyond the model's {len(blocks)} blocks; "
                              f"use block indices 0..{len(blocks) - 1}")
        if any(matches(o, adapter, b, i, n) for i, b in enumerate(blocks) for n in names[i]):
            continue
        if o.role is not None and not any(role_names(adapter, b, o.role) for b in blocks):
            raise ConfigError(f"{where}.role: the {adapter.name} adapter declares no {o.role} linears; "
                              "select them by regex instead")
        shown = sorted({n for ns in names for n in ns})[:8]
        raise ConfigError(f"{where} matches no linear in the model; fix its regex/role/blocks "
                          f"(block-relative names: {', '.join(shown)})")


# ---- automatic assignment ----------------------------------------------------------------------

@torch.no_grad()
def rtn_errors(weight: Tensor, sq_sum: Tensor | None, section: WeightQuantSection, bits: list[int]) -> dict[str, float]:
    """Per candidate bit width (as a string key, for JSON), the Hessian-diagonal-weighted RTN error."""
    from llmc.quant.registry import build_quantizer

    w = weight.detach().float()
    h = sq_sum.to(w.device, torch.float32)[None, :] if sq_sum is not None else torch.ones_like(w[:1])
    out = {}
    for b in sorted(set(bits)):
        q = build_quantizer(merge_section(section, {"bit": b}, WeightQuantSection), "weight")
        out[str(b)] = float(((w - q.fake_quant(w)).pow(2) * h).sum())
    return out


def assign_bits(params: dict[str, int], errors: dict[str, dict[str, float]], bits: list[int],
                budget: float) -> dict[str, int]:
    """Bits per linear with the parameter-weighted mean at most `budget`: greedy upgrades by error
    drop per added bit (ties: name order), each to the next candidate, while one fits."""
    bits = sorted(set(bits))
    total = sum(params.values())
    level = dict.fromkeys(params, 0)
    spent, limit = bits[0] * total, budget * total + 1e-6
    while True:
        best, best_gain = None, -1.0
        for name in sorted(params):
            k = level[name]
            if k + 1 == len(bits):
                continue
            cost = (bits[k + 1] - bits[k]) * params[name]
            if spent + cost > limit:
                continue
            gain = (errors[name][str(bits[k])] - errors[name][str(bits[k + 1])]) / cost
            if gain > best_gain:
                best, best_gain = name, gain
        if best is None:
            break
        spent += (bits[level[best] + 1] - bits[level[best]]) * params[best]
        level[best] += 1
    return {n: bits[k] for n, k in level.items()}


def solve_auto_scheme(quant: QuantSection, params: dict[str, int], errors: dict[str, dict[str, float]]) -> dict:
    """The assignment and what results.json records of it."""
    auto = quant.auto_scheme
    chosen = assign_bits(params, errors, auto.bits, auto.bits_per_weight)
    total = sum(params.values())
    reached = sum(chosen[n] * params[n] for n in chosen) / total if total else 0.0
    return {
        "bits_per_weight_budget": auto.bits_per_weight,
        "bits_per_weight": round(reached, 6),
        "candidates": sorted(set(auto.bits)),
        "definition": "parameter-weighted mean of weight code bits over the assigned linears (scales not counted)",
        "bits": chosen,
        "params": params,
        "sensitivity": errors,
    }
