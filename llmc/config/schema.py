"""Typed configuration, with ModelTC/llmc's section and key names.

An llmc YAML config runs here with at most its paths changed. Every section forbids
unknown keys; `llmc.config.loader` turns pydantic's errors into one line that names
the key and suggests the closest valid one.
"""

from __future__ import annotations

import difflib
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

WEIGHT_GRANULARITIES = ("per_tensor", "per_channel", "per_group", "per_block")
ACT_GRANULARITIES = ("per_tensor", "per_token", "per_group")
EVAL_POSITIONS = ("pretrain", "transformed", "fake_quant")


QUANT_TYPES = ("int-quant", "float-quant", "nvfp4", "mxfp4", "mxfp8")
FLOAT_BITS = ("e4m3", "e2m1")
MICROSCALING = {"nvfp4": ("e2m1", 16), "mxfp4": ("e2m1", 32), "mxfp8": ("e4m3", 32)}
"""quant_type: (element format, group size) of the microscaling formats (compressed-tensors' NVFP4, MXFP4,
MXFP8 schemes); their bit, granularity (per_group), group_size and symmetric keys default to these."""


def _check_bit(v: int | str) -> int | str:
    """An integer width 2..8 (int-quant) or a float format name: e4m3 (float-quant, mxfp8), e2m1 (nvfp4, mxfp4)."""
    if isinstance(v, str):
        if v.strip().lstrip("-").isdigit():
            v = int(v)
        elif v in FLOAT_BITS:
            return v
        else:
            raise ValueError(
                f"bit={v!r} is not a bit width; use an integer from 2 to 8, or e4m3 with quant_type: float-quant "
                "(e2m1 with nvfp4 or mxfp4)"
            )
    if not 2 <= v <= 8:
        raise ValueError(f"bit={v} is outside 2..8; use an integer bit width from 2 to 8")
    return v


Bit = Annotated[int | str, AfterValidator(_check_bit)]


def _float_quant_defaults(data: Any) -> Any:
    """float-quant (e4m3) has no zero point: symmetric defaults to true there; the microscaling
    formats fill in their element format, groups and symmetry."""
    if isinstance(data, dict) and data.get("quant_type") == "float-quant" and "symmetric" not in data:
        return {**data, "symmetric": True}
    if isinstance(data, dict) and isinstance(data.get("quant_type"), str) and data["quant_type"] in MICROSCALING:
        bit, size = MICROSCALING[data["quant_type"]]
        return {"bit": bit, "symmetric": True, "granularity": "per_group", "group_size": size, **data}
    return data


def _check_microscaling(s: Any) -> None:
    bit, size = MICROSCALING[s.quant_type]
    name = s.quant_type
    if s.bit != bit:
        raise ValueError(f"{name} values are {bit}, not bit {s.bit}; set bit: {bit} or remove the key")
    if s.granularity != "per_group":
        raise ValueError(f"{name} has one scale per group of {size} inputs; set granularity: per_group or remove the key")
    if s.group_size != size:
        raise ValueError(f"{name} has groups of {size}, not group_size {s.group_size}; set group_size: {size} "
                         "or remove the key")
    if not s.symmetric:
        raise ValueError(f"{name} has no zero point; set symmetric: true or remove the key")


def _check_quant_type(quant_type: str, bit: int | str, symmetric: bool) -> None:
    if quant_type == "int-quant" and isinstance(bit, str):
        fix = "float-quant" if bit == "e4m3" else "nvfp4 or mxfp4"
        raise ValueError(f"bit {bit} is a float format; set quant_type: {fix} (or an integer bit)")
    if quant_type == "float-quant":
        if not isinstance(bit, str):
            raise ValueError(f"quant_type float-quant needs bit: e4m3, not {bit}")
        if bit == "e2m1":
            raise ValueError("bit e2m1 (FP4) needs group scales; set quant_type: nvfp4 (groups of 16) or mxfp4 "
                             "(groups of 32)")
        if not symmetric:
            raise ValueError("float-quant (e4m3) has no zero point; set symmetric: true")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


SEED_MAX = 2**32 - 1
"""Seeds must fit numpy's legacy seed range (0..2**32-1); torch and random accept all of those."""
DEVICES = ("auto", "cpu", "cuda", "cuda:N")


def _check_seed(v: int | None) -> int | None:
    if v is not None and not 0 <= v <= SEED_MAX:
        raise ValueError(f"seed {v} is outside 0..{SEED_MAX} (numpy's seed range); use a seed from 0 to {SEED_MAX}")
    return v


Seed = Annotated[int, AfterValidator(_check_seed)]


def _check_device(v: str) -> str:
    index = v[len("cuda:"):] if v.startswith("cuda:") else None
    if v in ("auto", "cpu", "cuda") or (index is not None and index.isdigit() and index.isascii()):
        return v
    raise ValueError(f"{v!r} is not a device llmc runs on; use one of {', '.join(DEVICES)} (N = GPU index, e.g. cuda:0)")


def _no_bool(v: Any) -> Any:
    if isinstance(v, bool):  # pydantic would take true as block 1
        raise ValueError(f"{v!r} is not a block index; use integers like 0 or ranges like '2-5'")
    return v


def _check_block_id(v: int | str) -> int | str:
    if isinstance(v, int):
        if v < 0:
            raise ValueError(f"block id {v} is negative; block indices start at 0")
        return v
    lo, sep, hi = v.strip().partition("-")
    ok = lo.isdigit() and lo.isascii() and (not sep or (hi.isdigit() and hi.isascii()))
    if not ok:
        raise ValueError(f"block id {v!r} is not an index or a range; use integers like 0 or ranges like '2-5'")
    if sep and int(lo) > int(hi):
        raise ValueError(f"block range {v!r} runs backwards; write it first-last, e.g. '{hi}-{lo}'")
    return v


class BaseSection(Section):
    """Run-wide settings."""

    seed: Seed = Field(42, description=f"Seed for every random choice (calibration windows, torch); 0..{SEED_MAX}.")
    device: Annotated[str, AfterValidator(_check_device)] = Field(
        "auto", description="Compute device for one block at a time: auto (cuda if present), cpu, cuda, cuda:N."
    )
    act_cache: Literal["auto", "device", "cpu", "disk"] = Field(
        "auto", description="Where calibration activations live: auto (the memory planner decides: device, else "
        "cpu), device, cpu, or disk (one file per batch, host memory near one batch; opt-in, slower)."
    )
    act_cache_dir: str | None = Field(
        None, description="With act_cache: disk, where the run makes its cache folder (default: beside "
        "save.save_path, else the system temp dir); that folder is removed when the run ends, also on errors."
    )

    @model_validator(mode="after")
    def _cache_dir(self) -> BaseSection:
        if self.act_cache_dir is not None and self.act_cache != "disk":
            raise ValueError(f"act_cache_dir is used only with act_cache: disk (act_cache is {self.act_cache}); "
                             "set act_cache: disk or remove act_cache_dir")
        return self


class ModelSection(Section):
    """The model to compress."""

    type: str = Field("auto", description="Adapter name (Llama, Mistral, Qwen2, SmolLM, OPT...) or auto.")
    path: str = Field(..., description="HF model folder or hub id (hub only when online).")
    tokenizer_path: str | None = Field(None, description="Tokenizer folder; defaults to model.path.")
    tokenizer_mode: Literal["fast", "slow"] = Field("fast", description="Accepted for llmc compatibility.")
    gguf_file: str | None = Field(None, description="GGUF file name inside model.path (dequantized on load).")
    torch_dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="dtype of the loaded model; auto keeps the checkpoint's (float32 for GGUF)."
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the checkpoint folder.")
    allow_pickle: bool = Field(
        False, description="Load pickled weights (pytorch_model.bin, .pt, .pth); unpickling can run code, so only "
        "safetensors and GGUF load unless this is true."
    )
    stream: bool = Field(
        False, description="Disk-streamed model: each decoder block is read from the safetensors when the pipeline "
        "needs it and freed after (outputs written block by block), so host memory holds about one block plus the "
        "activation cache; see README, Models larger than host memory."
    )


class CalibSection(Section):
    """Calibration data (never the evaluation test text)."""

    name: str = Field("wikitext2", description="pileval, c4, wikitext2, ptb or custom.")
    download: bool = Field(False, description="Fetch `name` with HF datasets (needs network).")
    path: str | None = Field(None, description="Local file or folder; default: the bundled copy of `name`.")
    n_samples: int = Field(128, ge=1, description="Number of calibration sequences.")
    bs: int = Field(1, description="Sequences per forward batch; -1 = all in one batch.")
    seq_len: int = Field(512, ge=2, description="Tokens per calibration sequence.")
    preproc: str = Field("general", description="general (random windows) or padded_docs.")
    seed: Seed | None = Field(None, description="Seed for sampling; defaults to base.seed.")
    text_key: str = Field("text", description="Field holding the text in .json/.jsonl/.parquet files.")
    moe_all_experts: bool = Field(
        True, description="MoE models: while calibrating, run every token through every expert (the block output "
        "still combines only the routed experts), so each expert is quantized from all calibration tokens; false: "
        "each expert sees only the tokens its router sends it (and its gate/up inputs are not scaled by AWQ/SmoothQuant)."
    )
    moe_min_tokens: int = Field(
        128, ge=0, description="MoE models: experts the router sends fewer calibration tokens than this are named in "
        "a warning (the per-expert counts are in results.json under moe_routing); 0 = never."
    )

    @field_validator("bs")
    @classmethod
    def _bs(cls, v: int) -> int:
        if v == 0 or v < -1:
            raise ValueError("bs must be a positive batch size or -1 (all samples in one batch)")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        from llmc.data.sources import DATASET_NAMES

        return _one_of(v, DATASET_NAMES, "calibration data set")

    @field_validator("preproc")
    @classmethod
    def _preproc(cls, v: str) -> str:
        from llmc.data.calibration import PREPROCESSORS

        return _one_of(v, sorted(PREPROCESSORS), "calibration preproc")


class EvalSection(Section):
    """Perplexity evaluation (protocol in README), then lm-eval tasks when `tasks` names any."""

    eval_pos: list[Literal["pretrain", "transformed", "fake_quant"]] = Field(
        default_factory=lambda: ["pretrain", "fake_quant"], description="When to evaluate (perplexity, then eval.tasks)."
    )
    name: str | list[str] = Field("wikitext2", description="wikitext2, c4, ptb or custom (one or a list).")
    download: bool = Field(False, description="Fetch `name` with HF datasets (needs network).")
    path: str | None = Field(None, description="Local file or folder; default: the bundled copy.")
    seq_len: int = Field(2048, ge=2, description="Tokens per non-overlapping window.")
    bs: int = Field(1, ge=1, description="Windows per forward batch.")
    max_windows: int | None = Field(None, ge=1, description="Evaluate only the first N windows (None = all).")
    inference_per_block: bool = Field(False, description="Stream blocks through the device (big models).")
    tasks: list[str] = Field(
        default_factory=list, description="lm-eval tasks run after perplexity at each eval_pos (llmc.eval.downstream)."
    )
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples per task (None: the task's default).")
    limit: int | float | None = Field(
        None, gt=0, description="Examples per task: N >= 1, or a fraction in (0, 1) of each task (None = all)."
    )
    tasks_bs: int = Field(1, ge=1, description="lm-eval batch size (requests per forward).")
    tasks_local: bool | Literal["auto"] = Field(
        "auto", description="Bundled offline copies of piqa, lambada_openai, winogrande, openbookqa, boolq: "
        "auto = when HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set; false = lm-eval's hub tasks."
    )

    @field_validator("limit")
    @classmethod
    def _limit(cls, v: int | float | None) -> int | float | None:
        if isinstance(v, float) and v.is_integer() and v >= 1:
            return int(v)
        if isinstance(v, float) and not 0 < v < 1:
            raise ValueError(f"limit={v} is neither a count (an integer >= 1) nor a fraction in (0, 1); use e.g. 100 or 0.1")
        return v

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[str]) -> list[str]:
        for name in v:
            if not name or "," in name or name != name.strip():
                raise ValueError(f"task name {name!r} is malformed; list one lm-eval task name per item")
        if len(set(v)) != len(v):
            raise ValueError("a task is listed twice; list each task once")
        return v

    @property
    def names(self) -> list[str]:
        return [self.name] if isinstance(self.name, str) else list(self.name)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | list[str]) -> str | list[str]:
        from llmc.data.evaluation import EVAL_NAMES

        for name in [v] if isinstance(v, str) else v:
            _one_of(name, EVAL_NAMES, "evaluation data set")
        if not isinstance(v, str) and not v:
            raise ValueError(f"an empty list names no data set; use one of {', '.join(EVAL_NAMES)}")
        return v


class RangeSection(Section):
    """What weight and activation quantization share: how ranges are chosen and scaled."""

    calib_algo: Literal["minmax", "mse", "percentile", "learnable"] = Field(
        "minmax", description="Range: min/max, MSE clip search, percentile, or learnable (trained clipping: "
        "OmniQuant, FlatQuant)."
    )
    percentile: float = Field(99.9, gt=50, le=100, description="calib_algo percentile: upper percentile kept.")
    ste: bool = Field(True, description="llmc's straight-through estimator flag; rounding always passes gradients "
                      "straight through here, so only true is accepted.")

    @field_validator("ste")
    @classmethod
    def _ste(cls, v: bool) -> bool:
        if not v:
            raise ValueError("ste: false is not supported; rounding always uses the straight-through estimator "
                             "(remove the key)")
        return v
    sym_scale: Literal["qmax", "half_range"] = Field(
        "qmax", description="int-quant symmetric scale: absmax / qmax (llmc; /7 at 4 bits) or absmax / half the "
        "code range (half_range: compressed-tensors' and llm-compressor's, /7.5 at 4 bits)."
    )

    def _check_sym_scale(self) -> None:
        if self.sym_scale != "qmax" and (self.quant_type != "int-quant" or not self.symmetric):
            raise ValueError("sym_scale half_range applies to symmetric int-quant; remove it or set symmetric: true")


class WeightQuantSection(RangeSection):
    """Weight quantization."""

    quant_type: Literal["int-quant", "float-quant", "nvfp4", "mxfp4", "mxfp8"] = Field(
        "int-quant", description="int-quant (integer grid), float-quant (FP8, with bit: e4m3; per_block: FP8 "
        "blocks), nvfp4 (e2m1 values, e4m3 scale per 16, FP32 global scale), mxfp4 / mxfp8 (e2m1 / e4m3 values, "
        "power-of-two scale per 32); the last three imply their bit, per_group, group_size and symmetric: true."
    )
    bit: Bit = Field(4, description="Integer bits 2..8 (int-quant), or e4m3 (float-quant, mxfp8), e2m1 (nvfp4, mxfp4).")
    symmetric: bool = Field(False, description="Symmetric (no zero point) or asymmetric range.")
    round_zp: bool | None = Field(
        None, description="llmc's key: integer zero points (true, every method's grid) or float ones (false: "
        "methods that fit a float zero, HQQ and SpQR); unset: the method's default.")
    granularity: Literal["per_tensor", "per_channel", "per_group", "per_block"] = Field(
        "per_group", description="Rows sharing a scale: per_tensor, per_channel (output row), per_group, "
        "per_block (float-quant: block_size x block_size blocks, DeepSeek-V3's FP8 layout)."
    )
    group_size: int = Field(128, description="Input features per group for per_group; -1 otherwise.")
    block_size: int = Field(128, ge=1, description="per_block: rows and columns of each weight block.")

    @field_validator("granularity")
    @classmethod
    def _per_block(cls, v: str, info: Any) -> str:
        if v == "per_block" and info.data.get("quant_type") != "float-quant":
            raise ValueError("'per_block' is not allowed; use one of 'per_tensor', 'per_channel' or 'per_group' "
                             "(per_block is for FP8 blocks: quant_type: float-quant, bit: e4m3)")
        return v
    partial_group: bool = Field(
        False, description="Allow a narrower last group where group_size does not divide the input features."
    )

    @model_validator(mode="before")
    @classmethod
    def _float_defaults(cls, data: Any) -> Any:
        return _float_quant_defaults(data)

    @model_validator(mode="after")
    def _group(self) -> WeightQuantSection:
        _check_quant_type(self.quant_type, self.bit, self.symmetric)
        self._check_sym_scale()
        if self.quant_type in MICROSCALING:
            _check_microscaling(self)
        elif self.quant_type == "float-quant" and self.granularity == "per_group":
            raise ValueError("float-quant weights are per_tensor, per_channel or per_block; set granularity: "
                             "per_channel (or quant_type: mxfp8 for e4m3 in groups of 32)")
        if self.granularity == "per_group" and self.group_size < 1:
            raise ValueError("per_group needs group_size >= 1 (e.g. 128); or use granularity: per_channel")
        return self


class ActQuantSection(RangeSection):
    """Input-activation quantization of the quantized linears; omit for weight-only."""

    quant_type: Literal["int-quant", "float-quant", "nvfp4", "mxfp4", "mxfp8"] = Field(
        "int-quant", description="int-quant (integer grid), float-quant (FP8, with bit: e4m3), or nvfp4, mxfp4, "
        "mxfp8 (scales per group of 16 / 32 features of each token, computed from every input)."
    )
    bit: Bit = Field(8, description="Integer bits 2..8 (int-quant), or e4m3 (float-quant, mxfp8), e2m1 (nvfp4, mxfp4).")
    symmetric: bool = Field(True, description="Symmetric (no zero point) or asymmetric range.")
    granularity: Literal["per_tensor", "per_token", "per_group"] = Field(
        "per_token", description="One scale per token (dynamic), per tensor, or per group of group_size features "
        "of each token (dynamic; float formats: float-quant with group_size 128 for FP8 blocks, nvfp4, mxfp4, mxfp8)."
    )
    group_size: int = Field(-1, description="per_group: features per group (128 for FP8 blocks); -1 otherwise.")
    static: bool = Field(False, description="Calibrate one fixed range (per_tensor only) instead of dynamic; "
                         "nvfp4: calibrate the global scale (the group scales stay dynamic).")

    @model_validator(mode="before")
    @classmethod
    def _float_defaults(cls, data: Any) -> Any:
        return _float_quant_defaults(data)

    @model_validator(mode="after")
    def _static(self) -> ActQuantSection:
        _check_quant_type(self.quant_type, self.bit, self.symmetric)
        self._check_sym_scale()
        if self.quant_type in MICROSCALING:
            _check_microscaling(self)
            if self.static and self.quant_type != "nvfp4":
                raise ValueError(f"{self.quant_type} activations are dynamic (a power-of-two scale per group of "
                                 "each input); remove static")
            return self
        if self.granularity == "per_group":
            if self.quant_type != "float-quant":
                raise ValueError("per_group activations are float formats (float-quant, nvfp4, mxfp4, mxfp8); "
                                 "use granularity: per_token")
            if self.group_size < 1:
                raise ValueError("per_group activations need group_size >= 1 (128 for FP8 blocks)")
        if self.static and self.granularity != "per_tensor":
            raise ValueError("static activation quantization needs granularity: per_tensor")
        return self


class IgnoredLayers(Section):
    """Linears left in float."""

    block_ids: list[Annotated[int | str, BeforeValidator(_no_bool), AfterValidator(_check_block_id)]] = Field(default_factory=list, description="Blocks left in float: 0, '3-5'.")
    layer_names: list[str] = Field(default_factory=list, description="Linear names in a block: mlp.down_proj.")
    speical_names: list[str] = Field(default_factory=list, description="Full module names (llmc's spelling).")

    def blocks(self) -> set[int]:
        out: set[int] = set()
        for b in self.block_ids:
            if isinstance(b, int):
                out.add(b)
            else:
                lo, _, hi = str(b).partition("-")
                out.update(range(int(lo), int(hi or lo) + 1))
        return out


MODULE_ROLES = ("attn_in", "attn_out", "mlp_in", "mlp_out")
"""Adapter roles (`llmc.models.adapter.BlockRoles`) a `quant.overrides` entry may select linears by."""


class SchemeOverride(Section):
    """One `quant.overrides` entry: the linears it selects (every selector given must match) and their scheme."""

    regex: str | None = Field(None, description="Python regex matched in full against the block-relative linear "
                              "name (mlp.down_proj) or the full name (model.layers.3.mlp.down_proj).")
    role: Literal["attn_in", "attn_out", "mlp_in", "mlp_out"] | None = Field(
        None, description="The adapter's role of the linears: attn_in (q/k/v), attn_out (o), mlp_in (gate/up), mlp_out (down).")
    blocks: list[Annotated[int | str, BeforeValidator(_no_bool), AfterValidator(_check_block_id)]] | None = Field(
        None, description="Block ids the entry applies to: 0, '3-5' (default: every block).")
    weight: dict[str, Any] | None = Field(None, description="quant.weight keys merged over quant.weight (bit, "
                                          "group_size, granularity, symmetric, quant_type...).")
    act: dict[str, Any] | None = Field(None, description="quant.act keys merged over quant.act (or its defaults).")
    do_quant: bool = Field(True, description="false: leave the selected linears in float (llmc's mix_bits key).")

    def block_set(self) -> set[int] | None:
        return None if self.blocks is None else IgnoredLayers(block_ids=self.blocks).blocks()

    @model_validator(mode="after")
    def _selects(self) -> SchemeOverride:
        import re

        if self.regex is None and self.role is None and self.blocks is None:
            raise ValueError("an override selects nothing; give regex, role and/or blocks")
        if self.do_quant and self.weight is None and self.act is None:
            raise ValueError("an override changes nothing; give weight and/or act keys, or do_quant: false")
        if not self.do_quant and (self.weight is not None or self.act is not None):
            raise ValueError("do_quant: false leaves the linears in float; remove its weight/act keys")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"regex {self.regex!r} does not compile ({exc}); fix the pattern") from None
        return self


class AutoScheme(Section):
    """Automatic weight bit widths per linear under a bits-per-weight budget (`llmc.quant.schemes`)."""

    bits_per_weight: float = Field(..., gt=0, description="Budget: parameter-weighted mean of the weight code bits "
                                   "over the assigned linears (group scales and zeros not counted).")
    bits: list[Annotated[int, Field(ge=2, le=8)]] = Field(
        default_factory=lambda: [3, 4], description="Candidate integer bit widths, e.g. [3, 4].")

    @model_validator(mode="after")
    def _budget(self) -> AutoScheme:
        if not self.bits:
            raise ValueError("bits is empty; list the candidate bit widths, e.g. [3, 4]")
        if self.bits_per_weight < min(self.bits):
            raise ValueError(f"bits_per_weight {self.bits_per_weight} is below the smallest candidate "
                             f"{min(self.bits)}; raise it or add a smaller bit width to bits")
        return self


class KVCacheSection(Section):
    """Fake quantization of the keys and values attention caches (before or after RoPE)."""

    method: Literal["Naive", "Kivi"] = Field(
        "Naive", description="Naive: static scales calibrated on the calibration data (per_tensor or per_head); "
        "Kivi: dynamic, asymmetric, keys per channel (over groups of group_size tokens), values per token.")
    quant_type: Literal["int-quant", "float-quant"] = Field("int-quant", description="int-quant or float-quant "
                                                            "(FP8, with bit: e4m3; Naive only).")
    bit: Bit = Field(8, description="Integer bits 2..8 (int-quant) or e4m3 (float-quant).")
    symmetric: bool = Field(True, description="Symmetric range; default true for Naive, false for Kivi.")
    granularity: Literal["per_tensor", "per_head"] | None = Field(
        None, description="Naive: one static scale per layer (per_tensor, the default) or per head (per_head); "
        "Kivi fixes its own (keys per_channel, values per_token).")
    group_size: int = Field(-1, description="Kivi: tokens per key group (-1: the whole sequence).")
    post_rope: bool | None = Field(
        None, description="Quantize the keys after RoPE, as the attention hands them to its cache (what vLLM's "
        "k_scale scales), rather than k_proj's output; default: true with save_vllm / save_sgl, else false.")

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        data = _float_quant_defaults(data)
        if isinstance(data, dict) and data.get("symmetric") is None:
            data = {**data, "symmetric": data.get("method", "Naive") != "Kivi"}
        if isinstance(data, dict) and data.get("method", "Naive") != "Kivi" and data.get("granularity") is None:
            data = {**data, "granularity": "per_tensor"}
        return data

    @model_validator(mode="after")
    def _check(self) -> KVCacheSection:
        _check_quant_type(self.quant_type, self.bit, self.symmetric)
        if self.method == "Kivi":
            if self.quant_type != "int-quant":
                raise ValueError("kvcache method Kivi is integer quantization; set quant_type: int-quant")
            if self.granularity is not None:
                raise ValueError("kvcache method Kivi quantizes keys per channel and values per token; "
                                 "remove granularity")
        if self.group_size == 0 or self.group_size < -1:
            raise ValueError(f"kvcache.group_size {self.group_size} must be -1 or >= 1")
        return self


class QuantSection(Section):
    """The compression method and its quantization settings."""

    method: str | list[str] = Field(
        "RTN",
        description="Method name (RTN/Naive, ...), or a list run in order on the same model, e.g. [AWQ, GPTQ]; "
        "with a list, special is keyed by method name.",
    )
    weight: WeightQuantSection = Field(default_factory=WeightQuantSection)
    act: ActQuantSection | None = Field(None, description="Activation quantization; omit for weight-only.")
    special: dict[str, Any] = Field(default_factory=dict, description="Method-specific keys.")
    quant_out: bool | None = Field(
        None,
        description="Feed the next block from the quantized block's outputs; default: true when a method "
        "asks for it (GPTQ: its Hessians then see the quantized model's activations, as in llmc's GPTQ configs "
        "and llm-compressor), else false.",
    )
    ignored_layers: IgnoredLayers = Field(default_factory=IgnoredLayers)
    overrides: list[SchemeOverride] = Field(
        default_factory=list, description="Per-linear schemes (mixed precision), applied in order over "
        "quant.weight/act: each entry selects by regex, role and/or blocks (see llmc/quant/schemes.py).")
    auto_scheme: AutoScheme | None = Field(
        None, description="Choose each linear's weight bits from measured sensitivity under a bits-per-weight "
        "budget: {bits_per_weight: 3.5, bits: [3, 4]}; linears an override sets bits for keep them.")
    kvcache: KVCacheSection | None = Field(
        None, description="Quantize the KV cache (keys before or after RoPE, values): {method: Naive, bit: 8} "
        "(static per_tensor/per_head, int or FP8 e4m3; FP8 exports with save_vllm) or {method: Kivi, bit: 2}.")

    @property
    def methods(self) -> list[str]:
        return [self.method] if isinstance(self.method, str) else list(self.method)

    @model_validator(mode="after")
    def _methods(self) -> QuantSection:
        if not self.methods:
            raise ValueError("quant.method is an empty list; name at least one method, e.g. RTN")
        from llmc.quant.schemes import check_override_schemes

        check_override_schemes(self)
        return self


def _one_of(value: str, valid, what: str) -> str:
    if value in valid:
        return value
    close = difflib.get_close_matches(value, list(valid), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ValueError(f"unknown {what} {value!r}; {hint}use one of {', '.join(valid)}")


def _check_pattern(v: str) -> str:
    if v == "unstructured":
        return v
    n, sep, m = v.partition(":")
    if not (sep and n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
        raise ValueError(f"pattern {v!r} is not unstructured or N:M with 0 < N < M (e.g. 2:4, 4:8)")
    return v


class SparseWeightSection(Section):
    """Which weights to prune and how many."""

    sparsity: float | None = Field(
        None, ge=0, lt=1, description="Fraction of each linear's weights set to zero, per output row."
    )
    pattern: Annotated[str, AfterValidator(_check_pattern)] = Field(
        "unstructured", description="unstructured, or N:M (N zeros in every M consecutive inputs: 2:4, 4:8)."
    )
    layer_sparsity: list[Annotated[float, Field(ge=0, lt=1)]] | Literal["owl"] | None = Field(
        None, description="Per-block sparsity: a list (one per block), or owl (outlier-weighted, from "
        "calibration data, averaging `sparsity`); unstructured only."
    )
    owl_lambda: float = Field(0.08, ge=0, lt=1, description="OWL: largest deviation from `sparsity` per block.")
    owl_m: float = Field(5.0, gt=0, description="OWL: a score is an outlier above owl_m times its layer's mean.")
    n_prune_layers: int | None = Field(None, ge=1, description="ShortGPT: how many blocks to remove.")

    @property
    def n_m(self) -> tuple[int, int] | None:
        if self.pattern == "unstructured":
            return None
        n, _, m = self.pattern.partition(":")
        return int(n), int(m)

    @model_validator(mode="after")
    def _consistent(self) -> SparseWeightSection:
        if self.layer_sparsity is not None and self.n_m is not None:
            raise ValueError("layer_sparsity works with pattern: unstructured; N:M fixes the sparsity per group")
        return self


class SparseSection(Section):
    """Sparsification (pruning), run before quantization when both are given."""

    method: str = Field(..., description="Magnitude, Wanda, SparseGPT or ShortGPT.")
    weight: SparseWeightSection = Field(default_factory=SparseWeightSection)
    sparsity_out: bool | None = Field(
        None, description="Feed the next block from the pruned block's outputs (else from the dense ones); "
        "default: true for Wanda and SparseGPT (the papers' procedure), false otherwise."
    )
    special: dict[str, Any] = Field(default_factory=dict, description="Method-specific keys.")
    ignored_layers: IgnoredLayers = Field(default_factory=IgnoredLayers)


SAVE_FLAGS = ("save_trans", "save_fake", "save_vllm", "save_sgl", "save_autoawq", "save_mlcllm", "save_gptq")


class SaveSection(Section):
    """Outputs; everything lands in save_path (results.json always, models on request)."""

    save_trans: bool = Field(False, description="Write the transformed float model.")
    save_fake: bool = Field(False, description="Write the model with fake-quantized weights.")
    save_vllm: bool = Field(False, description="Write a compressed-tensors checkpoint (vLLM).")
    save_sgl: bool = Field(False, description="Write a compressed-tensors checkpoint (SGLang).")
    save_autoawq: bool = Field(False, description="Write AutoAWQ's GEMM layout (4-bit asymmetric).")
    save_mlcllm: bool = Field(False, description="Write the AutoAWQ layout for MLC-LLM's converter.")
    save_gptq: bool = Field(False, description="Write the GPTQ layout (qweight, qzeros, scales, g_idx).")
    save_path: str | None = Field(None, description="Output folder; created atomically at the end.")
    overwrite: bool = Field(False, description="Replace an existing save_path.")
    checkpoint: bool = Field(
        True,
        description="Checkpoint after every block (beside save_path, removed at the end) so an interrupted run "
        "resumes from its last finished block.",
    )


class LlmcConfig(Section):
    """A whole llmc run."""

    base: BaseSection = Field(default_factory=BaseSection)
    model: ModelSection
    calib: CalibSection | None = None
    eval: EvalSection | None = None
    quant: QuantSection | None = None
    sparse: SparseSection | None = None
    save: SaveSection = Field(default_factory=SaveSection)

    @model_validator(mode="after")
    def _consistency(self) -> LlmcConfig:
        wanted = [k for k in SAVE_FLAGS if getattr(self.save, k)]
        if wanted and not self.save.save_path:
            raise ValueError(f"{wanted[0]} needs save.save_path; set save.save_path: ./outputs/run1")
        if self.quant is not None and self.quant.act is not None and self.quant.act.static and self.calib is None:
            raise ValueError("static activation quantization needs a calib section to calibrate ranges")
        return self

    @property
    def calib_seed(self) -> int:
        return self.base.seed if self.calib is None or self.calib.seed is None else self.calib.seed
