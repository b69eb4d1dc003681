"""NVFP4, MXFP4, MXFP8 and block-wise FP8: reference encodings, compressed-tensors' arithmetic, RTN on a
tiny model, compressed-tensors exports decompressed by the library itself, and the config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from llmc import compress, load_config
from llmc.config.schema import QuantSection
from llmc.errors import ConfigError
from llmc.export import EXPORTERS
from llmc.methods.base import get_methods
from llmc.quant import fake_quant_modules
from llmc.quant.fp8_block import FP8BlockQuantizer
from llmc.quant.microscaling import MXQuantizer, NVFP4Quantizer, round_e2m1

ct = pytest.importorskip("compressed_tensors")
pytestmark = pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")

NVFP4 = {"quant_type": "nvfp4"}
FP8_BLOCK_W = {"quant_type": "float-quant", "bit": "e4m3", "granularity": "per_block"}
FP8_GROUP_A = {"quant_type": "float-quant", "bit": "e4m3", "granularity": "per_group", "group_size": 128}


def test_e2m1_rounding_table():
    # Every E2M1 value, the midpoints between them (ties go to the even mantissa) and values past 6.
    x = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 0.24, 0.25, 0.26, 0.74, 0.75, 1.25, 1.26, 1.74, 1.75,
                      2.5, 2.51, 3.49, 3.5, 5.0, 5.01, -0.25, -0.26, -1.75, -2.5, -5.01])
    want = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 0.0, 0.0, 0.5, 0.5, 1.0, 1.0, 1.5, 1.5, 2.0,
            2.0, 3.0, 3.0, 4.0, 4.0, 6.0, 0.0, -0.5, -2.0, -2.0, -6.0]
    assert round_e2m1(x).tolist() == want
    from compressed_tensors.quantization.utils.fp4_utils import cast_to_fp4

    y = (torch.randn(20000, generator=torch.Generator().manual_seed(0)) * 3).clamp(-6, 6)
    assert torch.equal(round_e2m1(y), cast_to_fp4(y.clone()))


def test_nvfp4_hand_computed_blocks():
    # Block A holds the tensor's absmax 3: global = 448 * 6 / 3 = 896, scale = e4m3(3 / 6 * 896) = 448,
    # step = 448 / 896 = 0.5, code = e2m1(2x). Block B: absmax 1, scale = e4m3(149.33) = 144 (e4m3 step 16).
    a = [3.0, -3.0, 0.1, 0.13, 0.37, 0.38, 0.62, 0.63, 0.875, 1.1, 1.25, -1.3, 1.75, 2.2, -2.6, 0.0]
    b = [1.0, -0.5, 0.2] + [0.0] * 13
    w = torch.tensor([a + b])
    q = NVFP4Quantizer()
    scale, glob = q.calc_qparams(w)
    assert scale.flatten().tolist() == [448.0, 144.0] and glob.flatten().tolist() == [896.0, 896.0]
    codes_a = [6, -6, 0, 0.5, 0.5, 1, 1, 1.5, 2, 2, 2, -3, 4, 4, -6, 0]
    codes_b = [6, -3, 1] + [0] * 13  # 1 / (144 / 896) = 6.22 clips to 6
    codes = q.quantize(w, scale, glob)
    assert codes.flatten().tolist() == codes_a + codes_b
    want = torch.tensor([codes_a]) * 0.5
    assert torch.equal(q.quant_dequant(w, scale, glob)[:, :16], want)
    assert torch.equal(q.quant_dequant(w, scale, glob)[:, 16:], torch.tensor([codes_b]) * (torch.tensor(144.0) / 896.0))
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8

    # Sign bit 8, magnitude = index in (0, 0.5, 1, 1.5, 2, 3, 4, 6); two codes per byte, low nibble first.
    assert pack_fp4_to_uint8(codes)[0, :8].tolist() == [0xF7, 0x10, 0x21, 0x32, 0x44, 0xD4, 0x66, 0x0F]


def test_mxfp4_and_mxfp8_hand_computed_blocks():
    # Row 0: absmax 3.5 = 1.75 * 2^1 rounds up to 4: MXFP4 scale 2^(2-2) = 1 (E8M0 127), MXFP8 2^(2-8) (121).
    # Row 1: absmax 3.4 = 1.7 * 2^1 rounds down to 2: MXFP4 scale 2^-1 (126), MXFP8 2^-7 (120).
    w = torch.zeros(2, 32)
    w[0, :6] = torch.tensor([3.5, -1.2, 0.3, 2.6, -0.24, 1.75])
    w[1, :4] = torch.tensor([3.4, -1.2, 0.3, 2.6])
    fp4 = MXQuantizer(bit="e2m1")
    scale, zero = fp4.calc_qparams(w)
    assert scale.flatten().tolist() == [1.0, 0.5] and not zero.any()
    codes = fp4.quantize(w, scale, zero)
    assert codes[0, :6].tolist() == [4.0, -1.0, 0.5, 3.0, 0.0, 2.0]
    assert codes[1, :4].tolist() == [6.0, -2.0, 0.5, 6.0]  # 3.4 / 0.5 = 6.8 clips
    assert fp4.quant_dequant(w, scale, zero)[1, :4].tolist() == [3.0, -1.0, 0.25, 3.0]
    fp8 = MXQuantizer(bit="e4m3")
    scale8, _ = fp8.calc_qparams(w)
    assert scale8.flatten().tolist() == [2.0**-6, 2.0**-7]
    assert fp8.quantize(w, scale8)[:, 0].float().tolist() == [224.0, 448.0]  # 435.2 rounds to 448
    from compressed_tensors.compressors.mx_utils import compress_mx_scale

    assert compress_mx_scale(torch.cat([scale, scale8]).flatten(), torch.uint8).tolist() == [127, 126, 121, 120]


def test_fp8_block_of_128x128_and_partial_blocks():
    w = torch.randn(200, 300, generator=torch.Generator().manual_seed(1))
    w[5, 200] = 40.0  # an outlier changes only its own block's scale
    q = FP8BlockQuantizer("per_block")
    scale, _ = q.calc_qparams(w)
    assert scale.shape == (2 * 3, 1)
    out = q.quant_dequant(w, scale, None)
    for i in range(2):
        for j in range(3):
            blk = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            s = blk.abs().max() / 448
            assert scale[i * 3 + j, 0] == s
            assert torch.equal(out[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128], (blk / s).to(torch.float8_e4m3fn).float() * s)
    assert scale[1, 0] == 40.0 / 448 and scale[0, 0] < 1


def ct_reference(w: torch.Tensor, quant_type: str, glob: torch.Tensor | None = None, block: int = 128) -> torch.Tensor:
    """compressed-tensors' own observer arithmetic and fake quantization of weight `w` (float32)."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    preset = {"nvfp4": "NVFP4", "mxfp4": "MXFP4", "mxfp8": "MXFP8", "fp8_block": "FP8_BLOCK"}[quant_type]
    args = PRESET_SCHEMES[preset]["weights"].model_copy()
    if quant_type == "fp8_block":
        args.block_structure = [block, block]
        rows, cols = -(-w.shape[0] // block), -(-w.shape[1] // block)
        padded = torch.nn.functional.pad(w, (0, cols * block - w.shape[1], 0, rows * block - w.shape[0]))
        blocks = padded.reshape(rows, block, cols, block).transpose(1, 2)
        scale, zero = calculate_qparams(blocks.amin((-1, -2)), blocks.amax((-1, -2)), args)
        return fake_quantize(w, scale, zero, args)
    groups = w.reshape(w.shape[0], -1, args.group_size)
    if quant_type == "nvfp4" and glob is None:
        glob = generate_gparam(w.min(), w.max())
    scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args, global_scale=glob)
    return fake_quantize(w, scale, zero, args, global_scale=glob)


@pytest.mark.parametrize("quant_type", ["nvfp4", "mxfp4", "mxfp8", "fp8_block"])
def test_fake_quant_equals_compressed_tensors_arithmetic(quant_type):
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(2)) * 0.05
    w[7, 9] = 1.3
    q = {"nvfp4": NVFP4Quantizer(), "mxfp4": MXQuantizer("e2m1"), "mxfp8": MXQuantizer("e4m3"),
         "fp8_block": FP8BlockQuantizer("per_block")}[quant_type]
    assert torch.equal(q.fake_quant(w), ct_reference(w, quant_type))
    mse = type(q)(**{**q.__dict__, "calib_algo": "mse"})
    assert (mse.fake_quant(w) - w).pow(2).sum() <= (q.fake_quant(w) - w).pow(2).sum()


@pytest.mark.parametrize("q", [NVFP4Quantizer(dynamic_groups=True), MXQuantizer("e2m1", dynamic_groups=True),
                               FP8BlockQuantizer("per_group")], ids=["nvfp4", "mxfp4", "fp8-group"])
def test_activations_are_quantized_per_token_group_with_straight_through_gradients(q):
    x = (torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3)) * 2).requires_grad_()
    if isinstance(q, NVFP4Quantizer):  # a calibrated global scale (static: true); group scales from the input
        _, glob = q.params_from_range(-x.detach().abs().max().reshape(1, 1), x.detach().abs().max().reshape(1, 1))
        assert glob.item() == 448 * 6 / x.detach().abs().max()
        qdq = lambda t: q.quant_dequant(t, torch.ones(1, 1), glob)  # noqa: E731
    else:
        qdq = q.fake_quant
    y = qdq(x)
    assert y.shape == x.shape and not torch.equal(y, x)
    # Each token's groups have their own scales: scaling one token leaves the others unchanged.
    x2 = x.detach().clone()
    x2[0, 0] *= 100
    assert torch.equal(qdq(x2)[1], y[1].detach()) and not torch.equal(qdq(x2)[0, 0], y[0, 0].detach() * 100)
    y.sum().backward()
    assert set(x.grad.unique().tolist()) <= {0.0, 1.0} and x.grad.mean() > 0.9


def run(model_dir: Path, out: Path | None, quant: dict, dtype: str = "float32"):
    save = {"save_vllm": True, "save_path": str(out)} if out is not None else {}
    cfg = tiny_config(model_dir, quant=quant, save=save)
    cfg["model"]["torch_dtype"] = dtype
    del cfg["eval"]
    return compress(load_config(cfg), progress=False)


def decompress(folder: Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """quantization_config, the saved tensors per quantized linear, and their dense weights decompressed
    by compressed-tensors' own compressor of the checkpoint's format."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    state = load_file(folder / "model.safetensors")
    scheme = QuantizationScheme.model_validate(qc["config_groups"]["group_0"])
    compressor = BaseCompressor.get_value_from_registry(qc["format"])
    names = {k.rpartition(".")[0] for k in state if k.endswith(".weight_scale")}
    local = {n: {k[len(n) + 1:]: v for k, v in state.items() if k.rpartition(".")[0] == n} for n in names}
    return qc, local, {n: compressor.decompress(t, scheme)["weight"] for n, t in local.items()}


FUSED = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))


def test_nvfp4_rtn_weights_tied_global_scales_and_export(tmp_path, tiny_llama_dir):
    result = run(tiny_llama_dir, tmp_path / "out", {"method": "RTN", "weight": NVFP4})
    modules = dict(fake_quant_modules(result.model))
    assert len(modules) == 3 * 7
    for block in range(3):
        for group in FUSED + (("self_attn.o_proj",), ("mlp.down_proj",)):
            names = [f"model.layers.{block}.{leaf}" for leaf in group]
            weights = [modules[n].weight.detach() for n in names]
            from compressed_tensors.quantization.utils import generate_gparam

            glob = min(generate_gparam(w.min(), w.max()) for w in weights)  # llm-compressor's fused update
            for n in names:
                assert modules[n].w_zero[0, 0] == glob, n  # one global scale per fused set
                assert torch.equal(modules[n].fake_weight(), ct_reference(modules[n].weight.detach(), "nvfp4", glob)), n
    qc, local, dense = decompress(tmp_path / "out" / "vllm_quant_model")
    assert qc["format"] == "nvfp4-pack-quantized" and qc["config_groups"]["group_0"]["input_activations"] is None
    q = local["model.layers.0.self_attn.q_proj"]
    assert {k: v.dtype for k, v in q.items()} == {"weight_packed": torch.uint8, "weight_scale": torch.float8_e4m3fn,
                                                  "weight_global_scale": torch.float32}
    assert q["weight_packed"].shape == (64, 32) and q["weight_scale"].shape == (64, 4)
    assert sorted(dense) == sorted(modules)
    for name, module in modules.items():  # the library dequantizes FP4 in bfloat16
        assert dense[name].dtype == torch.bfloat16
        assert torch.equal(dense[name], module.fake_weight().detach().to(torch.bfloat16)), name
    from llmc.inspect import inspect_checkpoint

    info = inspect_checkpoint(tmp_path / "out" / "vllm_quant_model")  # two FP4 codes per byte
    assert info.quantized_params == sum(m.weight.numel() for m in modules.values())


def test_nvfp4_w4a4_bf16_export_is_bit_equal_and_loads_in_transformers(tmp_path, tiny_llama_dir):
    quant = {"method": "RTN", "weight": NVFP4, "act": {"quant_type": "nvfp4", "static": True}}
    result = run(tiny_llama_dir, tmp_path / "out", quant, dtype="bfloat16")
    folder = tmp_path / "out" / "vllm_quant_model"
    qc, local, dense = decompress(folder)
    act = qc["config_groups"]["group_0"]["input_activations"]
    assert (act["strategy"], act["group_size"], act["dynamic"]) == ("tensor_group", 16, "local")
    for name, module in fake_quant_modules(result.model):
        assert dense[name].dtype == torch.bfloat16 and torch.equal(dense[name], module.fake_weight()), name
        assert local[name]["input_global_scale"] == module.a_zero[0, 0] > 0
    # q/k/v read one input: the same calibrated activation global scale
    scales = {local[f"model.layers.1.self_attn.{p}_proj"]["input_global_scale"].item() for p in "qkv"}
    assert len(scales) == 1
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16,
                                                  quantization_config=CompressedTensorsConfig(dequantize=True))
    for name, module in fake_quant_modules(result.model):
        assert torch.equal(loaded.get_submodule(name).weight, module.fake_weight()), name


@pytest.mark.parametrize("quant_type,dtype,act", [("mxfp4", "bfloat16", True), ("mxfp8", "float32", False)])
def test_mx_rtn_and_export(tmp_path, tiny_llama_dir, quant_type, dtype, act):
    quant = {"method": "RTN", "weight": {"quant_type": quant_type}}
    if act:
        quant["act"] = {"quant_type": quant_type}
    result = run(tiny_llama_dir, tmp_path / "out", quant, dtype=dtype)
    folder = tmp_path / "out" / "vllm_quant_model"
    qc, local, dense = decompress(folder)
    assert qc["format"] == {"mxfp4": "mxfp4-pack-quantized", "mxfp8": "mxfp8-quantized"}[quant_type]
    assert (qc["config_groups"]["group_0"]["input_activations"] is not None) == act
    for name, module in fake_quant_modules(result.model):
        fake = module.fake_weight().detach()
        assert torch.equal(fake.float(), ct_reference(module.weight.detach().float(), quant_type)), name
        assert local[name]["weight_scale"].dtype == torch.uint8
        assert dense[name].dtype == torch.bfloat16  # MX values are exact in bfloat16: equal for any dtype
        assert torch.equal(dense[name].float(), fake.float()), name
    if act:  # compressed-tensors' runtime (dynamic MX activations) computes exactly llmc's forward
        from transformers import AutoModelForCausalLM

        ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
        loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, result.model(ids).logits)


@pytest.mark.parametrize("block,dtype", [(128, "bfloat16"), (32, "float32")])
def test_fp8_block_rtn_and_export(tmp_path, tiny_llama_dir, block, dtype):
    quant = {"method": "RTN", "weight": {**FP8_BLOCK_W, "block_size": block},
             "act": {**FP8_GROUP_A, "group_size": block}}
    result = run(tiny_llama_dir, tmp_path / "out", quant, dtype=dtype)
    folder = tmp_path / "out" / "vllm_quant_model"
    qc, local, dense = decompress(folder)
    group = qc["config_groups"]["group_0"]
    assert qc["format"] == "float-quantized" and group["weights"]["block_structure"] == [block, block]
    assert (group["input_activations"]["strategy"], group["input_activations"]["group_size"]) == ("group", block)
    for name, module in fake_quant_modules(result.model):
        out, cols = module.weight.shape
        assert local[name]["weight_scale"].shape == (-(-out // block), -(-cols // block))
        assert local[name]["weight"].dtype == torch.float8_e4m3fn
        assert dense[name].dtype == module.weight.dtype and torch.equal(dense[name], module.fake_weight()), name
        if dtype == "float32":  # (bf16 models round the scales to bf16, so that the checkpoint stores them exactly)
            assert torch.equal(module.fake_weight(), ct_reference(module.weight.detach(), "fp8_block", block=block))
    if block == 32:  # compressed-tensors' runtime (dynamic FP8 token groups) computes exactly llmc's forward
        from transformers import AutoModelForCausalLM

        ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
        loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, result.model(ids).logits)


def _cfg(model_dir, weight, act=None, method="RTN", save=None):
    quant = {"method": method, "weight": weight}
    if act is not None:
        quant["act"] = act
    cfg = tiny_config(model_dir, quant=quant, save=save or {})
    del cfg["eval"]
    return cfg


@pytest.mark.parametrize("weight,act,words", [
    ({**NVFP4, "group_size": 32}, None, ["quant.weight", "nvfp4 has groups of 16", "group_size: 16"]),
    ({"quant_type": "mxfp4", "group_size": 16}, None, ["mxfp4 has groups of 32"]),
    ({**NVFP4, "bit": 4}, None, ["nvfp4 values are e2m1", "bit: e2m1"]),
    ({**NVFP4, "symmetric": False}, None, ["symmetric: true"]),
    ({"quant_type": "mxfp8", "granularity": "per_channel"}, None, ["granularity: per_group"]),
    ({"quant_type": "float-quant", "bit": "e2m1", "granularity": "per_channel"}, None, ["nvfp4", "mxfp4"]),
    ({"bit": "e2m1"}, None, ["float format", "nvfp4 or mxfp4"]),
    ({"granularity": "per_block"}, None, ["quant.weight.granularity", "float-quant"]),
    (NVFP4, {"quant_type": "mxfp4", "static": True}, ["quant.act", "dynamic", "remove static"]),
    (NVFP4, {"bit": 8, "granularity": "per_group", "group_size": 128}, ["quant.act", "per_token"]),
    (FP8_BLOCK_W, {**FP8_GROUP_A, "group_size": -1}, ["group_size >= 1"]),
])
def test_config_errors_are_one_line(tiny_llama_dir, weight, act, words):
    with pytest.raises(ConfigError) as exc:
        load_config(_cfg(tiny_llama_dir, weight, act))
    msg = str(exc.value)
    assert "\n" not in msg
    for word in words:
        assert word in msg, msg


@pytest.mark.parametrize("method,weight,words", [
    ("AWQ", NVFP4, "AWQ does not support quant_type: nvfp4.*RTN"),
    ("GPTQ", FP8_BLOCK_W, "GPTQ does not support quant_type: float-quant.*RTN.*nvfp4"),  # GPTQ does nvfp4/mx
])
def test_methods_without_float_formats_refuse_them(method, weight, words):
    quant = QuantSection(method=method, weight=weight)
    with pytest.raises(ConfigError, match=words):
        get_methods(quant)


@pytest.mark.parametrize("weight,act,words", [
    (NVFP4, {"quant_type": "nvfp4"}, ["static: true"]),
    (NVFP4, {"quant_type": "float-quant", "bit": "e4m3"}, ["nvfp4 weights", "quant.act.quant_type: nvfp4"]),
    (FP8_BLOCK_W, None, ["FP8_BLOCK", "group_size: 128"]),
    ({**FP8_BLOCK_W, "block_size": 64}, FP8_GROUP_A, ["group_size: 64"]),
    ({"bit": 8, "granularity": "per_channel", "symmetric": True}, FP8_GROUP_A, ["matching weights"]),
])
def test_exports_refused_with_one_line(tiny_llama_dir, tmp_path, weight, act, words):
    cfg = load_config(_cfg(tiny_llama_dir, weight, act, save={"save_vllm": True, "save_path": str(tmp_path)}))
    with pytest.raises(ConfigError) as exc:
        EXPORTERS["save_vllm"].check(cfg)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("save.save_vllm: ")
    for word in words:
        assert word in msg, msg
