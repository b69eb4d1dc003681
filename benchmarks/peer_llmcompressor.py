"""Run llm-compressor (the peer) on the same model, calibration ids and eval windows as llmc.

Runs in its own environment (llm-compressor pins transformers <= 5.17 and its own
compressed-tensors); `benchmarks/accuracy.py` calls it as a subprocess:

    .venv-peer/bin/python benchmarks/peer_llmcompressor.py --model DIR --calib calib.pt \
        --windows windows.pt --method GPTQ --bits 4 --group-size 128 [--asym] [--act-bits 8] \
        [--transform QuIP|SpinQuant]
    .venv-peer/bin/python benchmarks/peer_llmcompressor.py ... --method GPTQ --preset NVFP4A16

Prints one JSON line: {"ppl", "quantize_s", "versions", ...}. Perplexity is computed with
llmc's own evaluator (same protocol, same windows) on the model llm-compressor leaves in
memory (fake-quantized weights; activations quantized by its forward hooks). With a
quantization, the line also says that it was really applied: the fraction of the blocks'
linears that carry a scheme, the fraction whose input quantizer ran in a probe forward,
and how far the probe's logits moved from the float model's (a run whose logits did not
move fails).
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def scheme(args: argparse.Namespace):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, preset_name_to_scheme

    if args.preset:  # compressed-tensors' own scheme of that name (NVFP4A16, NVFP4, MXFP4A16, ...)
        return {"group_0": preset_name_to_scheme(args.preset, ["Linear"])}
    grouped = args.group_size > 0
    weights = QuantizationArgs(
        num_bits=args.bits, type="int", symmetric=not args.asym,
        strategy="group" if grouped else "channel", group_size=args.group_size if grouped else None,
    )
    acts = None
    if args.act_bits:
        acts = QuantizationArgs(num_bits=args.act_bits, type="int", symmetric=True, strategy="token", dynamic=True)
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts)}


def apply_quantization(model: torch.nn.Module, fired: set[str] | None = None) -> int:
    """Make the in-memory model compute what the exported checkpoint would.

    After `oneshot`, llm-compressor 0.14 leaves QuantizationModifier's layers with their scheme,
    scales and zero points but running unquantized (perplexity equals the float model's; GPTQ
    alone writes its result into the weights). Fake-quantize each weight with its stored
    parameters (idempotent for GPTQ's on-grid weights) and each quantized input with the
    library's own `forward_quantize`, after any online rotation of the input (the transforms'
    hooks are prepended). Names of layers whose input quantizer runs are added to `fired`.
    Returns the number of quantized layers.
    """
    from compressed_tensors.offload import update_offload_parameter
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize, forward_quantize

    count = 0
    fired = set() if fired is None else fired
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or not isinstance(module, torch.nn.Linear):
            continue
        count += 1
        if scheme.weights is not None:
            with torch.no_grad():  # the model is dispatched: writes go through its offload cache
                update_offload_parameter(module, "weight", fake_quantize(
                    module.weight, module.weight_scale, getattr(module, "weight_zero_point", None), scheme.weights,
                    global_scale=getattr(module, "weight_global_scale", None)))  # NVFP4's per-tensor scale
        if scheme.input_activations is not None:
            def quantize_input(m, inputs, a=scheme.input_activations, name=name):
                fired.add(name)
                return (forward_quantize(m, inputs[0], "input", a),)

            module.register_forward_pre_hook(quantize_input)
        module.quantization_enabled = False  # our hooks and weights now do it, exactly once
    return count


def block_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


def online_transforms(model: torch.nn.Module) -> int:
    """Rotations llm-compressor runs at inference (not fused into weights): QuIP's input side, SpinQuant's R4."""
    return sum(1 for m in model.modules()
               if type(m).__name__.endswith("Transform") and getattr(m, "args", None) is not None
               and m.args.is_online())


@torch.no_grad()
def probe_logits(model: torch.nn.Module, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    from llmc.pipeline.offload import on_device

    with on_device(model, device):
        return model(input_ids=ids.to(device), use_cache=False).logits.float().cpu()


def applied(model: torch.nn.Module, ids: torch.Tensor, device: torch.device, reference: torch.Tensor,
            fired: set[str]) -> dict:
    """Evidence that the evaluated model is the quantized one (see the module docstring)."""
    linears = block_linears(model)
    schemed = [n for n, m in linears.items() if getattr(m, "quantization_scheme", None) is not None]
    act_quantized = [n for n in schemed if linears[n].quantization_scheme.input_activations is not None]
    fired.clear()
    logits = probe_logits(model, ids, device)
    change = float((logits - reference).norm() / reference.norm())
    out = {"quantized_linears": f"{len(schemed)}/{len(linears)}",
           "quantized_fraction": len(schemed) / max(len(linears), 1),
           "act_quant_fired": f"{len(fired & set(act_quantized))}/{len(act_quantized)}",
           "online_transforms": online_transforms(model), "logits_rel_change": change}
    if change < 1e-4:
        raise SystemExit(f"llm-compressor's in-memory model computes the float model's logits "
                         f"(relative change {change:.2e}): its quantization is not applied")
    if len(fired & set(act_quantized)) < len(act_quantized):
        raise SystemExit(f"input quantizers ran in {out['act_quant_fired']} quantized linears of the probe")
    return out


def allow_cpu_only() -> None:
    """llm-compressor 0.14's AWQ asks torch.accelerator for a device and pins its activation cache
    even when it runs on CPU, and its GPTQ logs the accelerator's peak memory; both fail on a machine
    without an accelerator: answer "cpu", make pinning a no-op and report no memory (none changes
    what it computes)."""
    torch.accelerator.current_accelerator = lambda *a, **k: torch.device("cpu")
    torch.accelerator.current_device_index = lambda *a, **k: 0
    torch.accelerator.max_memory_allocated = lambda *a, **k: 0
    torch.accelerator.get_memory_info = lambda *a, **k: (0, 1)
    torch.Tensor.pin_memory = lambda self, *a, **k: self


def sparse_recipe(args: argparse.Namespace) -> list:
    from llmcompressor.modifiers.pruning import (
        MagnitudePruningModifier,
        SparseGPTModifier,
        WandaPruningModifier,
    )

    if args.sparse_method == "Magnitude":
        # A training-time schedule in llm-compressor; oneshot applies init_sparsity once.
        return [MagnitudePruningModifier(
            targets=[r"re:model\.layers\.\d+\..*_proj\.weight"], init_sparsity=args.sparsity,
            final_sparsity=args.sparsity, start=0, end=1, update=1, mask_structure=args.mask_structure)]
    common = dict(sparsity=args.sparsity, mask_structure=args.mask_structure, ignore=["re:.*lm_head"])
    if args.sparse_method == "Wanda":
        return [WandaPruningModifier(**common)]
    if args.sparse_method == "SparseGPT":
        return [SparseGPTModifier(**common, block_size=128, dampening_frac=0.01)]
    raise SystemExit(f"unknown sparse method {args.sparse_method}")


def decoder_sparsity(model: torch.nn.Module) -> float:
    """Fraction of zeros over the decoder blocks' linears of the model as left in memory."""
    zeros = total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    return zeros / max(total, 1)


def transform_recipe(args: argparse.Namespace) -> list:
    """Rotations before the quantization. Random Hadamard matrices: the plain "hadamard" type needs
    powers of two, and SmolLM2 is 576 = 36 x 16 wide (a known order-36 Hadamard times 16 works)."""
    from llmcompressor.modifiers.transform import QuIPModifier, SpinQuantModifier

    if args.transform == "QuIP":
        # Input side ("v") of every linear but lm_head: fused into the weight, online on the input.
        return [QuIPModifier(rotations=["v"], transform_type="random-hadamard", ignore="lm_head")]
    if args.transform == "SpinQuant":
        # R1 (residual stream) and R2 (per head, v/o) fused into weights, R4 online before down_proj:
        # QuaRot's rotations, not learned (llm-compressor 0.14 learns none).
        return [SpinQuantModifier(rotations=["R1", "R2", "R4"], transform_type="random-hadamard")]
    return []


def recipe(args: argparse.Namespace) -> list:
    return (transform_recipe(args) + (sparse_recipe(args) if args.sparse_method else [])
            + (quant_recipe(args) if args.method else []))


def quant_recipe(args: argparse.Namespace) -> list:
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    groups = scheme(args)
    if args.method == "GPTQ":
        # A preset row runs GPTQ without act-order, as llmc's side of the formats table.
        return [GPTQModifier(config_groups=groups, ignore=["lm_head"], block_size=128, dampening_frac=0.01,
                             actorder=None if args.preset else args.actorder)]
    if args.method == "AWQ":
        # In llm-compressor 0.14 AWQ only transforms; a quantization modifier must follow it.
        return [AWQModifier(n_grid=20), QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
    if args.method == "SmoothQuant":
        return [SmoothQuantModifier(smoothing_strength=args.alpha),
                QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
    if args.method == "RTN":
        return [QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
    raise SystemExit(f"unknown method {args.method}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", required=True, help="torch file with a LongTensor [n, seq_len]")
    parser.add_argument("--windows", required=True, help="torch file with eval windows [n, seq_len]")
    parser.add_argument("--method", default=None, choices=["GPTQ", "AWQ", "SmoothQuant", "RTN"])
    parser.add_argument("--sparse-method", default=None, choices=["Magnitude", "Wanda", "SparseGPT"])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--mask-structure", default="0:0", help="0:0 (unstructured) or N:M")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--asym", action="store_true")
    parser.add_argument("--act-bits", type=int, default=0)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--actorder", default=None)
    parser.add_argument("--transform", default=None, choices=["QuIP", "SpinQuant"])
    parser.add_argument("--preset", default=None, help="compressed-tensors preset scheme, e.g. NVFP4A16, MXFP4A16")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import compressed_tensors
    import llmcompressor
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmc.eval.perplexity import evaluate_perplexity
    from llmc.models import get_adapter

    if torch.accelerator.current_accelerator() is None:
        allow_cpu_only()
    torch.manual_seed(0)
    calib = torch.load(args.calib)
    windows = torch.load(args.windows)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    device = torch.device(args.device)
    probe = windows[:1, :128]
    reference = probe_logits(model, probe, device) if args.method else None
    start = time.perf_counter()
    recipe_used = recipe(args)
    oneshot(
        model=model, tokenizer=tokenizer, dataset=data, recipe=recipe_used,
        num_calibration_samples=calib.shape[0], max_seq_length=calib.shape[1],
        shuffle_calibration_samples=False,
    )
    quantize_s = time.perf_counter() - start
    model.eval()
    fired: set[str] = set()
    if args.method and not apply_quantization(model, fired):
        raise SystemExit("llm-compressor left no quantized layer")
    checks = applied(model, probe, device, reference, fired) if args.method else {}
    result = evaluate_perplexity(model, get_adapter("auto", model.config.model_type), windows, device,
                                 progress=False, dataset="wikitext2",
                                 position="fake_quant" if args.method else "transformed")
    print(json.dumps({
        "ppl": result.ppl, "quantize_s": quantize_s, "sparsity": decoder_sparsity(model), "windows": result.windows,
        "seq_len": result.seq_len, "recipe": [type(m).__name__ for m in recipe_used], **checks,
        "versions": {"llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__,
                     "transformers": transformers.__version__, "torch": torch.__version__},
    }))


if __name__ == "__main__":
    main()
