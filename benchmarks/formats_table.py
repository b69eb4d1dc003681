"""Issue 15's table (`benchmarks/accuracy.py --table formats`): outlier-aware, data-free and
mixed-precision methods, today's low-precision formats and the KV cache, on the real SmolLM2.

Each method sits beside round-to-nearest (and GPTQ) at the same bits; llm-compressor runs beside
the formats it has (its NVFP4/MXFP4 preset schemes, RTN and GPTQ).
"""

from __future__ import annotations

G128 = {"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 128, "partial_group": True}
W8_CHANNEL = {"bit": 8, "symmetric": True, "granularity": "per_channel", "group_size": -1}
W4_CHANNEL = {"bit": 4, "symmetric": True, "granularity": "per_channel", "group_size": -1}
PER_TOKEN = {"symmetric": True, "granularity": "per_token"}
# GPTQ without act-order in this table: the formats' group scales follow the sweep (as llm-compressor
# does for NVFP4/MXFP4), and one GPTQ setting keeps the rows comparable.
GPTQ_PLAIN = {"actorder": False}

FORMAT_SETTINGS: dict[str, tuple[dict, dict | None]] = {
    "W4A16 g128": (G128, None),
    "W3A16 g128": ({**G128, "bit": 3}, None),
    "W4A4": (W4_CHANNEL, {"bit": 4, **PER_TOKEN}),
    "W8A8": (W8_CHANNEL, {"bit": 8, **PER_TOKEN}),
    # 576 features are 9 groups of 64: DGQ's int8 group scales need whole groups.
    "W4A8 g64": ({"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 64},
                 {"bit": 8, **PER_TOKEN}),
    "NVFP4A16": ({"quant_type": "nvfp4"}, None),
    "MXFP4A16": ({"quant_type": "mxfp4"}, None),
    "NVFP4 (W4A4)": ({"quant_type": "nvfp4"}, {"quant_type": "nvfp4", "static": True}),
    "MXFP8A16": ({"quant_type": "mxfp8"}, None),
    "KV cache (weights W8 RTN)": (W8_CHANNEL, None),
}
PRESETS = {"NVFP4A16": "NVFP4A16", "MXFP4A16": "MXFP4A16", "NVFP4 (W4A4)": "NVFP4", "MXFP8A16": "MXFP8A16"}
"""compressed-tensors' preset scheme llm-compressor runs beside each format setting."""

KV_ROWS = {
    "float KV": None,
    "Naive FP8 per-tensor": {"method": "Naive", "quant_type": "float-quant", "bit": "e4m3"},
    # what vLLM's FP8 cache applies (and what an export writes): keys after RoPE
    "Naive FP8 per-tensor post-RoPE": {"method": "Naive", "quant_type": "float-quant", "bit": "e4m3",
                                        "post_rope": True},
    "Naive int8 per-tensor": {"method": "Naive", "bit": 8},
    "Naive int8 per-head": {"method": "Naive", "bit": 8, "granularity": "per_head"},
    "Naive int4 per-head": {"method": "Naive", "bit": 4, "granularity": "per_head"},
    "KIVI int4 g128": {"method": "Kivi", "bit": 4, "group_size": 128},
    "KIVI int2 g128": {"method": "Kivi", "bit": 2, "group_size": 128},
}


def formats_plan() -> list[tuple[str, str, dict]]:
    """Rows as (setting, label, config sections); labels hold no comma (`--only` splits on commas)."""
    runs: list[tuple[str, str, dict]] = [("FP32", "FP", {})]

    def add(setting: str, method: str, special: dict | None = None, label: str | None = None,
            peer: dict | None = None, **quant_extra) -> None:
        weight, act = FORMAT_SETTINGS[setting]
        quant = {"method": method, "weight": weight, **({"act": act} if act else {}), **quant_extra}
        if special:
            quant["special"] = special
        runs.append((setting, label or method, {"quant": quant, **({"peer": peer} if peer is not None else {})}))

    for setting in ("W4A16 g128", "W3A16 g128"):
        add(setting, "RTN")
        add(setting, "GPTQ", GPTQ_PLAIN)
        add(setting, "HQQ")
        add(setting, "OWQ", {"target_bit": FORMAT_SETTINGS[setting][0]["bit"] + 0.05})  # OWQ's paper setting
        add(setting, "SpQR")
        add(setting, "AdaDim")
    add("W4A4", "RTN")
    add("W4A4", "QUIK", {"fp_features": 32, "fp_relative": True})  # 32 of 576 = 256 of 4096 (paper)
    add("W8A8", "RTN")
    add("W8A8", "LlmInt8")
    add("W4A8 g64", "RTN")
    add("W4A8 g64", "DGQ")
    for setting, preset in PRESETS.items():
        add(setting, "RTN", peer={"preset": preset, "method": "RTN"})
        if setting != "NVFP4 (W4A4)":
            add(setting, "GPTQ", GPTQ_PLAIN, peer={"preset": preset, "method": "GPTQ"})
            # llm-compressor's observer takes every group's scale from the original weight before the sweep
            add(setting, "GPTQ", {**GPTQ_PLAIN, "static_groups": True}, label="GPTQ static groups")
    # 3.5 bits per weight: half the parameters at 3 bits, half at 4, chosen by measured sensitivity.
    mixed = {"bits_per_weight": 3.5, "bits": [3, 4]}
    add("W4A16 g128", "RTN", label="RTN auto-scheme 3.5 bpw", auto_scheme=mixed)
    add("W4A16 g128", "GPTQ", GPTQ_PLAIN, label="GPTQ auto-scheme 3.5 bpw", auto_scheme=mixed)
    for label, kv in KV_ROWS.items():
        add("KV cache (weights W8 RTN)", "RTN", label=label, **({"kvcache": kv} if kv else {}))
    return runs


FORMAT_METHODS = ("GPTQ (both tools): damping 0.01, block 128, no act-order; other methods with llmc's default "
                  "special keys except as noted below; llm-compressor: see the recipe column")

FORMAT_NOTES = [
    "- Integer weights: groups of 128 asymmetric (`partial_group`: 576 = 4.5 x 128), or per output channel "
    "symmetric where activations are quantized; activations per token, symmetric, dynamic. GPTQ without "
    "act-order in this table (both tools). Method keys (`quant.special`) at their defaults except: OWQ "
    "`target_bit` bits + 0.05 (the OWQ paper's 3.05 / 4.05 average bits), QUIK 32 float features of 576 "
    "(the paper's 256 of 4096) with `fp_relative`.",
    "- Formats: NVFP4 = FP4 e2m1 values, e4m3 scale per 16, FP32 global scale; MXFP4 / MXFP8 = e2m1 / e4m3 "
    "values, power-of-two scale per 32. llm-compressor runs compressed-tensors' preset of the same name "
    "(NVFP4A16, MXFP4A16, NVFP4 with static-global-scale activations, MXFP8A16).",
    "- Auto-scheme rows: `quant.auto_scheme: {bits_per_weight: 3.5, bits: [3, 4]}` on the W4A16 g128 "
    "setting; compare with the W3A16 g128 and W4A16 g128 rows of the same method.",
    "- KV-cache rows: weights W8 per-channel RTN (near float), then the keys (before RoPE unless the row says "
    "post-RoPE) and values fake-quantized as stored in the cache; `float KV` is the same run without it.",
    "- Session 10 (2026-12-01, code at 9070e05, shown as 9070e05-dirty: the device copy held the updated "
    "result files): the remaining rows, `bash benchmarks/device_run.sh accuracy --windows 40 --table formats` "
    "(with `--resume`, every row not yet in the table).",
    "- \"not available\": the method was not registered in llmc when the row ran; \"error\": its run failed "
    "(message shown). `--resume` runs both again.",
]
