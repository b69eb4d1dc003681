"""Online input transforms (QuaRot's Hadamard before down_proj) in a compressed-tensors checkpoint.

compressed-tensors describes them in `quantization_config.transform_config`: a `TransformScheme` per
matrix, applied at location `input` of the listed linears (`x -> x @ W / sqrt(n)`, W the stored
+-1 matrix under `<linear>.<scheme>_input.weight`). vLLM (compressed_tensors/transform) attaches a
`HadamardTransform` to each such linear and applies it before the (quantized) matmul: type
`hadamard` with its hadacore kernel (Sylvester matrices, powers of two), any other type as a dense
matmul with the stored matrix; single GPU only (no tensor parallelism). One stored copy per
scheme: vLLM shares a scheme's matrix between its layers, as llm-compressor's checkpoints do.

transformers (5.x) does not apply `transform_config` when it loads such a folder; vLLM does.
"""

from __future__ import annotations

import logging
import math

from torch import Tensor, nn

from llmc.errors import ConfigError
from llmc.quant.hadamard import OnlineHadamard

log = logging.getLogger("llmc")

SCHEME = "online_hadamard"


def online_transforms(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear's online input transform, by the linear's name."""
    return {name: t for name, module in model.named_modules()
            if (t := getattr(module, "input_transform", None)) is not None}


def transform_config(model: nn.Module, dtype) -> tuple[object | None, dict[str, Tensor]]:
    """The `TransformConfig` of the model's online transforms and the tensors to store (None, {}: none)."""
    from compressed_tensors.transform import TransformArgs, TransformConfig, TransformScheme

    transforms = online_transforms(model)
    if not transforms:
        return None, {}
    by_width: dict[int, list[str]] = {}
    for name, t in transforms.items():
        if not isinstance(t, OnlineHadamard) or not t.hadamard or t.signs is not None:
            raise ConfigError(f"the online transform of {name} ({t!r}) is not a plain Hadamard matrix, which is all "
                              f"compressed-tensors' transform_config describes here; disable the online rotation")
        by_width.setdefault(t.n, []).append(name)
    groups, state = {}, {}
    for n, names in sorted(by_width.items()):
        scheme = SCHEME if len(by_width) == 1 else f"{SCHEME}_{n}"
        sylvester_only = n & (n - 1) == 0  # vLLM's hadacore computes exactly these
        groups[scheme] = TransformScheme(
            type="hadamard" if sylvester_only else "random-hadamard",
            apply=[TransformArgs(targets=names, location="input")],
        )
        weight = (transforms[names[0]].matrix() * math.sqrt(n)).round()
        state[f"{names[0]}.{scheme}_input.weight"] = weight.to(dtype).contiguous()
    log.info("compressed-tensors transform_config: online Hadamard before %d linears (%s); vLLM applies it "
             "(single GPU), transformers does not", len(transforms), ", ".join(f"n={n}" for n in by_width))
    return TransformConfig(config_groups=groups), state
