"""What an llmc quantization config is in compressed-tensors terms, and which configs it cannot be.

`ct_format(quant)` names the compressed-tensors format and `ct_scheme(quant)` builds the
`QuantizationScheme` (weights and input activations) for the quantized linears:

| llmc config                                              | format          | vLLM scheme     |
| -------------------------------------------------------- | --------------- | --------------- |
| int4/int8 weight-only, per_group or per_channel, sym/asym | pack-quantized  | WNA16           |
| int8 per_channel sym weights + int8 sym activations      | int-quantized   | W8A8 int8       |
| e4m3 per_tensor/per_channel weights + e4m3 activations   | float-quantized | W8A8 FP8        |

NVFP4, MXFP4, MXFP8 and FP8 blocks are `llmc.export.ct_formats` (compressed-tensors' presets).

`unsupported(quant)` returns why a config has no such checkpoint (vLLM's compressed-tensors
loader is the reference for what is servable), or None.
"""

from __future__ import annotations

from llmc.config.schema import LlmcConfig, QuantSection
from llmc.export import ct_formats, ct_kvcache

FUSED = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))
"""Linears vLLM and SGLang fuse into one (qkv_proj, gate_up_proj): all of them or none may stay in float."""

WEIGHT_ONLY_BITS = (4, 8)
"""vLLM's WNA16 kernels take 4- and 8-bit weights; compressed-tensors packs 2..8 bits but 2/3-bit
checkpoints would not load in vLLM or SGLang."""


def is_float(section: object) -> bool:
    return section is not None and section.quant_type == "float-quant"


def unsupported(cfg: LlmcConfig) -> str | None:
    """Why `cfg` cannot be written as a compressed-tensors checkpoint (with the fix), or None."""
    quant = cfg.quant
    if quant is None:
        if cfg.sparse is not None:
            return None  # a pruned float model: written dense (llmc.export.ct_sparse)
        return "there is no quant or sparse section to export; add quant (e.g. RTN, 4-bit weights)"
    kv_problem = ct_kvcache.unsupported(cfg)
    if kv_problem is not None:
        return kv_problem
    w, a = quant.weight, quant.act
    split = split_fused(quant)
    if split:
        return (f"ignored_layers leaves {split[0]} in float but not {split[1]}; vLLM/SGLang fuse them, "
                "so ignore all of them or none")
    if any(m.lower() == "gptq" for m in quant.methods) and _gptq_actorder(quant):
        return ("GPTQ act-order groups (special actorder: true) are not stored by compressed-tensors; "
                "set actorder: false")
    if ct_formats.handles(quant):
        return ct_formats.unsupported(quant)
    if is_float(w):
        if a is None or not is_float(a):
            return ("FP8 weights export as W8A8 FP8 only; add quant.act with quant_type: float-quant, "
                    "bit: e4m3")
        return None
    if w.granularity == "per_tensor":
        return "per_tensor integer weights are not exported; set quant.weight.granularity: per_channel"
    if w.granularity == "per_group" and w.partial_group:
        return ("compressed-tensors groups must divide the input features; set quant.weight.partial_group: "
                "false with a dividing group_size, or granularity: per_channel")
    if a is None:
        if w.bit not in WEIGHT_ONLY_BITS:
            return (f"{w.bit}-bit weights are not servable by vLLM/SGLang (weight-only takes 4 or 8 bits); "
                    "set quant.weight.bit: 4 or 8")
        return None
    if is_float(a):
        return "int weights with FP8 activations are not a compressed-tensors scheme; use int8 activations"
    if w.bit != 8 or a.bit != 8:
        return (f"with activation quantization only W8A8 int8 is exported (got w{w.bit}a{a.bit}); "
                "set quant.weight.bit: 8 and quant.act.bit: 8, or drop quant.act for weight-only")
    if w.granularity != "per_channel" or not w.symmetric:
        return "W8A8 int8 needs symmetric per_channel weights; set quant.weight.symmetric: true, granularity: per_channel"
    if not a.symmetric:
        return "W8A8 int8 export needs symmetric activations; set quant.act.symmetric: true"
    if a.granularity == "per_tensor" and not a.static:
        return ("dynamic int8 activations must be per_token; set quant.act.granularity: per_token "
                "(or static: true for per_tensor)")
    return None


def split_fused(quant: QuantSection) -> tuple[str, str] | None:
    """(an ignored linear, a quantized one) of one fused set, or None when no fused set is split."""
    ignored = quant.ignored_layers
    names = [(None, n) for n in ignored.layer_names]
    for full in ignored.speical_names:
        for group in FUSED:
            for leaf in group:
                if full.endswith("." + leaf):
                    names.append((full[: -len(leaf) - 1], leaf))
    for prefix, leaf in names:
        group = next((g for g in FUSED if leaf in g), None)
        if group is None:
            continue
        for other in group:
            if other in ignored.layer_names:
                continue
            if prefix is not None and f"{prefix}.{other}" in ignored.speical_names:
                continue
            here = leaf if prefix is None else f"{prefix}.{leaf}"
            return here, other if prefix is None else f"{prefix}.{other}"
    return None


def _gptq_actorder(quant: QuantSection) -> bool:
    special = quant.special
    if len(quant.methods) > 1:
        special = next((v for k, v in special.items() if k.lower() == "gptq"), {}) or {}
    return bool(special.get("actorder", False)) if isinstance(special, dict) else False


def ct_format(quant: QuantSection) -> str:
    if ct_formats.handles(quant):
        return ct_formats.ct_format(quant)
    if is_float(quant.weight):
        return "float-quantized"
    return "pack-quantized" if quant.act is None else "int-quantized"


def ct_scheme(quant: QuantSection):
    """The compressed-tensors QuantizationScheme of every quantized linear of this config."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    if ct_formats.handles(quant):
        return ct_formats.ct_scheme(quant)
    w, a = quant.weight, quant.act
    strategy = {"per_group": "group", "per_channel": "channel", "per_tensor": "tensor"}[w.granularity]
    weights = QuantizationArgs(
        num_bits=8 if is_float(w) else w.bit,
        type="float" if is_float(w) else "int",
        symmetric=w.symmetric,
        strategy=strategy,
        group_size=w.group_size if strategy == "group" else None,
        dynamic=False,
    )
    inputs = None
    if a is not None:
        inputs = QuantizationArgs(
            num_bits=8 if is_float(a) else a.bit,
            type="float" if is_float(a) else "int",
            symmetric=a.symmetric,
            strategy="token" if a.granularity == "per_token" else "tensor",
            dynamic=not a.static,
        )
    return QuantizationScheme(targets=["Linear"], weights=weights, input_activations=inputs, format=ct_format(quant))
