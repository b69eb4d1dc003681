"""CPU check behind the HQQ finding of the formats table: the hqq library itself (Mobius Labs,
`hqq.core.quantize.Quantizer`, axis 1, optimize=True) against plain RTN on SmolLM2-135M, W3 g64,
WikiText-2 test, first 3 windows x 2048 (llmc's protocol), every decoder linear quantized.

    pip download hqq==0.2.8.post1 --no-deps -d /tmp/hqq && tar xzf /tmp/hqq/hqq-*.tar.gz -C /tmp/hqq
    python benchmarks/hqq_reference_check.py /tmp/hqq/hqq-0.2.8.post1

(hqq imports `termcolor` only to colour log lines: a stub is put on the path if it is missing.)
Measured 2026-12-01 on CPU: RTN 79.55, hqq 194.10; llmc's HQQ (`quant.method: HQQ`, same
setting, `compress` with max_windows 3) 120.46. HQQ's lower lp/L2 weight error does not carry
over to this model's perplexity; llmc's fit is the closer of the two to RTN.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import smollm2_hf_dir  # noqa: E402

from llmc.data.evaluation import load_eval_text, tokenize_windows  # noqa: E402
from llmc.eval.perplexity import evaluate_perplexity  # noqa: E402
from llmc.models import get_adapter  # noqa: E402


def rtn(weight: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    rows = weight.reshape(-1, group)
    low, high = rows.amin(1, keepdim=True), rows.amax(1, keepdim=True)
    scale = (high - low).clamp(min=1e-8) / (2**bits - 1)
    zero = torch.round(-low / scale)
    return ((torch.round(rows / scale) + zero).clamp(0, 2**bits - 1) - zero).mul(scale).reshape(weight.shape)


def main() -> None:
    try:
        import termcolor  # noqa: F401
    except ImportError:
        stub = Path(tempfile.mkdtemp())
        (stub / "termcolor.py").write_text("def colored(text, *args, **kwargs):\n    return text\n")
        sys.path.insert(0, str(stub))
    sys.path.insert(0, sys.argv[1])
    from hqq.core.quantize import Quantizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bits, group = 3, 64
    folder = smollm2_hf_dir()
    windows = tokenize_windows(load_eval_text("wikitext2"), AutoTokenizer.from_pretrained(folder), 2048, 3)
    for mode in ("rtn", "hqq"):
        model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                w = module.weight.data
                if mode == "rtn":
                    module.weight.data = rtn(w, bits, group)
                else:
                    q, meta = Quantizer.quantize(w, nbits=bits, group_size=group, optimize=True, axis=1,
                                                 bitpack=False, compute_dtype=torch.float32, device="cpu")
                    module.weight.data = Quantizer.dequantize(q, meta).reshape(w.shape).float()
        result = evaluate_perplexity(model, get_adapter("SmolLM"), windows, torch.device("cpu"))
        print(mode, round(result.ppl, 2), flush=True)


if __name__ == "__main__":
    main()
