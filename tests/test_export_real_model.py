"""AutoAWQ and GPTQ exports of the real SmolLM2-135M (RTN W4 g64 asymmetric; 576 and 1536 input
features). RTN keeps it short: the calibrated methods' layouts are covered on the tiny models.
Every linear dequantizes bit for bit to the fake weight with float16 scales, through AutoAWQ's
unpacking and through transformers + GPTQModel, whose logits match the fake model's."""

from __future__ import annotations

import pytest
import torch
from export_checks import autoawq_packing_utils, consumer_load, fp16_reference, read_tensors

from llmc import compress
from llmc.export import quantized_linears

pytestmark = pytest.mark.real_model


def test_real_model_awq_and_gptq_exports(real_model_path, tmp_path):
    out = tmp_path / "out"
    cfg = {
        "base": {"seed": 0, "device": "cpu"},
        "model": {"type": "SmolLM", "path": str(real_model_path), "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
                  "torch_dtype": "float32"},
        "quant": {"method": "RTN", "weight": {"bit": 4, "symmetric": False, "group_size": 64}},
        "save": {"save_autoawq": True, "save_gptq": True, "save_path": str(out)},
    }
    result = compress(cfg, progress=False)
    layers = quantized_linears(result.model)
    assert len(layers) == 30 * 7
    pu = autoawq_packing_utils()
    awq = read_tensors(out / "autoawq_quant_model")
    for layer in layers:
        q = [awq[f"{layer.name}.{k}"] for k in ("qweight", "qzeros", "scales")]
        dense = pu.dequantize_gemm(q[0], q[1], q[2].float(), 4, 64).T
        assert torch.equal(dense, fp16_reference(layer)), layer.name

    # The GPTQ folder also goes through transformers (the AWQ one does on the tiny models: the
    # writer of the float16 rest, tied embeddings included, is the same).
    ids = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(0))
    [dense], [kernel] = consumer_load([out / "gptq_quant_model"], ids, tmp_path)
    assert kernel == "TorchLinear"
    for layer in layers:
        assert torch.equal(dense[layer.name], fp16_reference(layer)), layer.name
    with torch.no_grad():
        expected = result.model(ids).logits
    # float16 activations through 30 blocks vs float32: agree to a small fraction of the logit range.
    assert (dense["logits"] - expected).abs().max() < 0.02 * expected.abs().max()
