"""CPU check behind the sym_scale finding (benchmarks/results/accuracy_smollm2_rotations.md): QuaRot+GPTQ
W4A4 on the real SmolLM2, 32 x 512 C4 calibration tokens, first 8 WikiText-2 windows x 2048, with llmc's
symmetric scale (`sym_scale: qmax`, absmax / 7) or compressed-tensors' (`half_range`, absmax / 7.5).
Measured 2026-12-01 on 2 CPU cores: qmax 52.72, half_range 46.67 (the half_range number was taken with
the same arithmetic patched in, before the key existed).

    python benchmarks/rotation_scale_check.py qmax|half_range
"""

from __future__ import annotations

import json
import sys
import time

from llmc.config.loader import load_config
from llmc.fetch import default_cache_dir
from llmc.runner import compress


def main() -> None:
    sym_scale = sys.argv[1] if len(sys.argv) > 1 else "qmax"
    cfg = {
        "base": {"seed": 42, "device": "cpu"},
        "model": {"type": "SmolLM", "path": f"{default_cache_dir()}/models/smollm2-135m-instruct",
                  "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "torch_dtype": "float32"},
        "calib": {"name": "c4", "n_samples": 32, "bs": 8, "seq_len": 512, "seed": 42},
        "eval": {"eval_pos": ["fake_quant"], "name": "wikitext2", "seq_len": 2048, "max_windows": 8},
        "quant": {"method": ["QuaRot", "GPTQ"],
                  "weight": {"bit": 4, "symmetric": True, "granularity": "per_channel", "group_size": -1,
                             "sym_scale": sym_scale},
                  "act": {"bit": 4, "symmetric": True, "granularity": "per_token", "sym_scale": sym_scale},
                  "special": {"GPTQ": {"actorder": True, "static_groups": True}}},
        "save": {"checkpoint": False},
    }
    start = time.time()
    result = compress(load_config(cfg), progress=False)
    print(json.dumps({"sym_scale": sym_scale, "ppl": result.ppl("fake_quant"), "seconds": time.time() - start}))


if __name__ == "__main__":
    main()
