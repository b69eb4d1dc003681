"""Load exported AutoAWQ / GPTQ folders the way their consumers do, in a separate process.

    python tests/export_consumer.py RESULT.safetensors IDS.pt FOLDER [FOLDER ...]

Each folder is loaded by transformers (`AutoModelForCausalLM.from_pretrained`, float16, CPU) whose
AWQ and GPTQ integrations build GPTQModel's pure-torch kernels (`backend="torch_awq"` for AWQ,
`backend="torch"` for GPTQ via optimum; the default backends JIT-compile C++ CPU kernels first,
which takes minutes). Every quantized linear is then dequantized by the library's own code:
GPTQModel's `dequantize_gemm` (its copy of AutoAWQ's) for AWQ, and
`PackableQuantLinear.dequantize_weight` for GPTQ (after GPTQModel's own v1 -> v2 zero-point
conversion), with the float16 scales widened to float32 so the products are exact. RESULT gets
`<i>/<linear>` dense weights `[out, in]` and `<i>/logits` for the token ids in IDS.pt.

A subprocess, because importing GPTQModel rewrites HF_HOME, adds a root logging handler and
sets other process-wide state the rest of the test suite must not inherit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file


def load(folder: Path):
    from transformers import AutoModelForCausalLM, AwqConfig, GPTQConfig

    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    if qc["quant_method"] == "awq":
        override = AwqConfig(bits=qc["bits"], group_size=qc["group_size"], backend="torch_awq")
    else:
        override = GPTQConfig(bits=qc["bits"], group_size=qc["group_size"], backend="torch")
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float16, device_map="cpu", quantization_config=override
    )
    return model.eval(), qc


@torch.no_grad()
def dense(module, qc: dict) -> torch.Tensor:
    if qc["quant_method"] == "awq":
        from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

        w = dequantize_gemm(module.qweight, module.qzeros, module.scales.float(), qc["bits"], qc["group_size"])
    else:
        saved = module.scales
        module.scales = saved.float()
        w = module.dequantize_weight()
        module.scales = saved
    return w.float().T.contiguous()


def main(argv: list[str]) -> None:
    out, ids_path, folders = Path(argv[0]), Path(argv[1]), [Path(f) for f in argv[2:]]
    ids = torch.load(ids_path)
    result, kernels = {}, {}
    for i, folder in enumerate(folders):
        model, qc = load(folder)
        for name, module in model.named_modules():
            if hasattr(module, "qweight"):
                result[f"{i}/{name}"] = dense(module, qc)
                kernels[str(i)] = type(module).__name__
        with torch.no_grad():
            result[f"{i}/logits"] = model(ids).logits.float().contiguous()
    save_file(result, str(out), metadata={"kernels": json.dumps(kernels)})


if __name__ == "__main__":
    main(sys.argv[1:])
