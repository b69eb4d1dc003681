"""Fake quantization: the integer and FP8 quantizers and the fake-quant linear layer."""

from llmc.quant.fake_linear import FakeQuantLinear, fake_quant_modules, quant_disabled
from llmc.quant.fp8 import FP8Quantizer
from llmc.quant.quantizer import IntQuantizer, round_ste

__all__ = ["FP8Quantizer", "FakeQuantLinear", "IntQuantizer", "fake_quant_modules", "quant_disabled", "round_ste"]
