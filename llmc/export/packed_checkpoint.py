"""Write a transformers checkpoint folder whose quantized linears are replaced by packed tensors.

Shared by the AutoAWQ and GPTQ layouts, which both follow the convention of their reference
writers (AutoAWQ's `save_quantized`, GPTQModel's `save_quantized`): every other floating tensor
in float16, the packed tensors under `<linear>.qweight`, `<linear>.qzeros`, `<linear>.scales`
(plus `g_idx` for GPTQ) next to the linear's float16 `bias`, `config.json` carrying
`quantization_config`, safetensors shards (`model.safetensors`, or `model-0000i-of-0000n` plus
`model.safetensors.index.json` above 5 GB, as `save_pretrained` names them), and the tokenizer.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from llmc.errors import ModelError
from llmc.export.base import QuantizedLinear

MAX_SHARD_BYTES = 5 * 1024**3


def float_linear_names(model: nn.Module) -> list[str]:
    """Plain nn.Linear modules left in float (ignored layers and the like), output head excluded."""
    out_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and m is not out_head]


def float16_state(model: nn.Module, replaced: set[str]) -> dict[str, Tensor]:
    """The model's state dict in float16, without the weights in `replaced` and without tied copies."""
    state: dict[str, Tensor] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for key, tensor in model.state_dict().items():
        if key in replaced:
            continue
        # A tied weight (lm_head = embed_tokens) appears twice; keep the first, transformers re-ties it.
        ident = (tensor.data_ptr(), tuple(tensor.shape))
        if tensor.numel() and ident in seen:
            continue
        seen.add(ident)
        t = tensor.detach().cpu()
        if t.is_floating_point():
            half = t.to(torch.float16)
            if torch.isinf(half).any() and not torch.isinf(t).any():
                raise ModelError(
                    f"{key} exceeds float16's range, and this layout stores float16 weights; "
                    f"use save_fake, or leave the layer unquantized and keep the model in its dtype"
                )
            t = half
        state[key] = t
    return state


def fp16_scales(layer: QuantizedLinear) -> Tensor:
    """The layer's scales `[out, n_groups]` rounded to float16, refusing ones float16 cannot hold."""
    scale = layer.scale.to(torch.float16)
    if not torch.isfinite(scale).all():
        raise ModelError(
            f"{layer.name}: a weight scale exceeds float16's range ({layer.scale.max().item():.3g}); "
            f"this layout stores float16 scales; use save_fake or a smaller-range model"
        )
    return scale


def integer_zeros(layer: QuantizedLinear, bits: int) -> Tensor:
    """The layer's zero points as int32, refusing non-integers or values outside `[0, 2^bits)`."""
    zero = layer.zero.round().to(torch.int32)
    if not torch.equal(zero.float(), layer.zero) or zero.min() < 0 or zero.max() >= 2**bits:
        raise ModelError(f"{layer.name}: zero points are not integers in [0, {2**bits - 1}]")
    return zero


def natural_order(layer: QuantizedLinear) -> bool:
    """Whether each input column's group is `j // group_size` (no act-order permutation of groups)."""
    q = layer.quantizer
    step = q.group_size if q.granularity == "per_group" else layer.codes.shape[1]
    return torch.equal(layer.g_idx.long(), torch.arange(layer.codes.shape[1]) // step)


def write_packed_checkpoint(
    model: nn.Module,
    tokenizer: object,
    folder: Path,
    layers: list[QuantizedLinear],
    pack: Callable[[QuantizedLinear], dict[str, Tensor]],
    quantization_config: dict,
    extra_json: dict[str, dict] | None = None,
) -> None:
    """Write the checkpoint: `pack(layer)` gives each quantized linear's tensors (keys without prefix)."""
    if not layers:
        raise ModelError("the model has no quantized linears to export; set quant.method (e.g. RTN)")
    state = float16_state(model, {f"{q.name}.weight" for q in layers})
    for layer in layers:
        for key, tensor in pack(layer).items():
            state[f"{layer.name}.{key}"] = tensor.contiguous()
        if layer.module.bias is not None:
            state[f"{layer.name}.bias"] = layer.module.bias.detach().cpu().to(torch.float16)
    save_shards(state, folder)

    config = copy.deepcopy(model.config)
    config.quantization_config = quantization_config
    config.dtype = "float16"
    config.save_pretrained(folder)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)
    for name, data in (extra_json or {}).items():
        (folder / name).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(folder)


def save_shards(state: dict[str, Tensor], folder: Path, max_bytes: int = MAX_SHARD_BYTES) -> None:
    """safetensors in shards of at most `max_bytes` (one tensor larger than that gets a shard alone)."""
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
