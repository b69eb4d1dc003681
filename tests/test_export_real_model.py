"""AutoAWQ, GPTQ and compressed-tensors (vLLM) exports of the real SmolLM2-135M (RTN W4 g64 asymmetric;
576 and 1536 input features), all written by one run (one GGUF load and one RTN pass shared by the
tests). RTN keeps it short: the calibrated methods' layouts are covered on the tiny models.
Every linear dequantizes bit for bit to the fake weight with float16 scales, through AutoAWQ's
unpacking and through transformers + GPTQModel, whose logits match the fake model's; the
compressed-tensors folder decompresses bit for bit through compressed-tensors' own compressor."""

from __future__ import annotations

import pytest
import torch
from export_checks import autoawq_packing_utils, consumer_load, fp16_reference, read_tensors

from llmc import compress
from llmc.export import quantized_linears

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def exported(real_model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("real_export") / "out"
    cfg = {
        "base": {"seed": 0, "device": "cpu"},
        "model": {"type": "SmolLM", "path": str(real_model_path), "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
                  "torch_dtype": "float32"},
        "quant": {"method": "RTN", "weight": {"bit": 4, "symmetric": False, "group_size": 64}},
        "save": {"save_autoawq": True, "save_gptq": True, "save_vllm": True, "save_path": str(out)},
    }
    return compress(cfg, progress=False), out


def test_real_model_awq_and_gptq_exports(exported, tmp_path):
    result, out = exported
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


def test_real_smollm2_int4_g64_asym(exported):
    """compressed-tensors (save_vllm): int4 g64 asymmetric, bit-equal on all 210 linears, size on disk
    ~ theoretical (moved here from test_export_ct.py to share the run above)."""
    pytest.importorskip("compressed_tensors")
    from test_export_ct import assert_bit_equal

    from llmc.inspect import inspect_checkpoint

    result, out = exported
    folder = out / "vllm_quant_model"
    assert_bit_equal(result, folder)
    info = inspect_checkpoint(folder)
    assert len(info.quantized) == 210 and info.weights == "int4, group 64, asymmetric"
    assert 0.9 <= info.ratio <= 1.1, info.ratio
    print(f"\nSmolLM2-135M int4 g64 asym: disk {info.disk_bytes:,} B, theoretical {info.theoretical_bytes:,} B, "
          f"params {info.params:,}")
