"""Integer fake quantization: the quantizer and the fake-quant linear layer."""

from llmc.quant.fake_linear import FakeQuantLinear, fake_quant_modules, quant_disabled
from llmc.quant.quantizer import IntQuantizer, round_ste

__all__ = ["FakeQuantLinear", "IntQuantizer", "fake_quant_modules", "quant_disabled", "round_ste"]
