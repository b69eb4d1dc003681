"""llm-compressor on the same random-weight model and calibration ids as `speed.py` (GPU).

Prints one JSON line with wall time of `oneshot` (model load excluded) and peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def recipe(run: str) -> list:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    w4 = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=128)
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=w4)}
    if run in ("gptq", "gptq_parallel"):
        return [GPTQModifier(config_groups=groups, ignore=["lm_head"], actorder=None)]
    if run == "gptq_actorder":
        return [GPTQModifier(config_groups=groups, ignore=["lm_head"], actorder="static")]
    if run == "awq":
        # In llm-compressor 0.14 AWQ only transforms; a quantization modifier must follow it.
        return [AWQModifier(n_grid=20), QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
    if run == "rtn":
        return [QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
    if run == "sq":
        w8 = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
        a8 = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
        scheme = {"group_0": QuantizationScheme(targets=["Linear"], weights=w8, input_activations=a8)}
        return [SmoothQuantModifier(smoothing_strength=0.5), QuantizationModifier(config_groups=scheme,
                                                                                  ignore=["lm_head"])]
    if run in ("sparsegpt24", "wanda24"):
        from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

        cls = SparseGPTModifier if run == "sparsegpt24" else WandaPruningModifier
        return [cls(sparsity=0.5, mask_structure="2:4", ignore=["re:.*lm_head"])]
    raise SystemExit(f"unknown run {run}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--run", required=True)
    parser.add_argument("--n-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args()

    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (args.n_samples, args.seq_len),
                        generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    # oneshot wants a tokenizer object even for pre-tokenized data; a word-level stand-in suffices.
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    start = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, dataset=data, recipe=recipe(args.run),
            num_calibration_samples=args.n_samples, max_seq_length=args.seq_len, shuffle_calibration_samples=False)
    if cuda:
        torch.cuda.synchronize()
    print(json.dumps({"tool": "llm-compressor", "run": args.run, "seconds": time.perf_counter() - start,
                      "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
                      "version": llmcompressor.__version__}))


if __name__ == "__main__":
    main()
