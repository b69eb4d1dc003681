"""Config checks shared by the integer weight-only layouts (AutoAWQ GEMM, GPTQ).

Both layouts hold integer weights with float16 per-group (or per-channel) scales and run the
activations in float16, so a config they cannot express is refused before the model is loaded:
activation quantization, per-tensor weights, partial last groups. Each message names the flag,
the problem and the fix, as every llmc ConfigError does.
"""

from __future__ import annotations

from llmc.config.schema import LlmcConfig
from llmc.errors import ConfigError


def require_weight_only(cfg: LlmcConfig, key: str, granularities: tuple[str, ...]) -> None:
    """Refuse configs without weight quantization, with activation quantization, or with partial groups."""
    quant = cfg.quant
    if quant is None:
        raise ConfigError(f"save.{key} needs quantized weights; add a quant section (e.g. method: RTN)")
    if quant.act is not None:
        raise ConfigError(
            f"save.{key} stores weight-only checkpoints and cannot express activation quantization "
            f"(quant.act); remove quant.act, or use save_vllm (compressed-tensors) for W8A8"
        )
    w = quant.weight
    if w.quant_type != "int-quant":
        raise ConfigError(
            f"save.{key} stores integer weights, not quant.weight.quant_type {w.quant_type}; "
            f"use quant_type: int-quant, or save_vllm (compressed-tensors) for FP8"
        )
    if w.granularity not in granularities:
        raise ConfigError(
            f"save.{key} supports quant.weight.granularity {' or '.join(granularities)}, not {w.granularity}; "
            f"set quant.weight.granularity: per_group"
        )
    if w.granularity == "per_group" and w.partial_group:
        raise ConfigError(
            f"save.{key} needs whole groups (no partial last group); set quant.weight.partial_group: false "
            f"and a group_size dividing every layer's input features (e.g. 64 for 576 and 1536)"
        )


def arbitrary_groups(cfg: LlmcConfig) -> bool:
    """Whether the final method may give columns arbitrary groups (g_idx not `j // group_size`)."""
    from llmc.methods import get_methods

    return cfg.quant is not None and get_methods(cfg.quant)[-1].arbitrary_group_order
