"""The block-wise schedule: capture block inputs, then one block on the device at a time."""

from llmc.pipeline.blockwise import BlockContext, BlockwisePipeline, ModuleCall, check_finite, run_block
from llmc.pipeline.capture import BlockInputs, capture_block_inputs, tree_to

__all__ = [
    "BlockContext",
    "BlockInputs",
    "BlockwisePipeline",
    "ModuleCall",
    "capture_block_inputs",
    "check_finite",
    "run_block",
    "tree_to",
]
