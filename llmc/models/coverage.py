"""Does an adapter's declaration cover its model? Every linear of a block must be a declared
quantization target or declared float on purpose (routers); fused 3-D expert parameters must
have been turned into per-expert linears by the adapter's `prepare` step."""

from __future__ import annotations

from torch import nn

from llmc.models.adapter import ModelAdapter


def uncovered(adapter: ModelAdapter, block: nn.Module) -> list[str]:
    """Names (relative to the block) of linears and fused expert parameters the adapter misses."""
    declared = set(adapter.block_linear_names(block)) | set(adapter.block_float_linears(block))
    missing = []
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear) and name not in declared:
            missing.append(name)
        elif name not in declared:
            missing.extend(f"{name}.{p}" if name else p for p, t in module.named_parameters(recurse=False)
                           if t.dim() >= 3)
    return missing
