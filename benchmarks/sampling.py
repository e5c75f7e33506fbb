"""Sampling throughput: N answers per ML-1M prompt, four ways, same prompts.

  (a) naive    one ``model.generate`` call per sample
  (b) batched  ``model.generate`` with ``num_return_sequences`` over a batch of prompts
  (c) ours     the shared-prefix sampler that ``dpo4rec generate`` uses (timed before and after (b), summed)
  (d) llama.cpp  ``llama-cpp-python`` on the same GGUF file, if installed

All use the same model (bf16 where the CPU has it; llama.cpp runs the Q4_1 GGUF),
top-p 0.9, temperature 1.0, and count new tokens (EOS excluded) per wall second.

    python benchmarks/sampling.py                 # 64 prompts, N = 10, 64 new tokens
    python benchmarks/sampling.py --quick         # a smaller version, about a minute
    python benchmarks/sampling.py --json out.json
    python benchmarks/sampling.py --device cuda --model FOLDER --batch-rows 2816 --hf-batch-rows 2816 --skip naive llama_cpp
                                                  # a GPU, any Llama-family folder, model.generate at the same batch
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from roofline import FlopCounter, add, best_rates, measured_rates, seconds_at  # noqa: E402

from dpo4rec.config import DataConfig, ModelConfig, PromptConfig  # noqa: E402
from dpo4rec.data.stage import run_data_stage  # noqa: E402
from dpo4rec.devices import resolve_device  # noqa: E402
from dpo4rec.llm import best_dtype, load_model, load_tokenizer, packaged_gguf  # noqa: E402
from dpo4rec.generate.sampler import FastSampler, HFSampler, SamplerSettings, batch_generator, plan_batches  # noqa: E402
from dpo4rec.prompts.stage import run_prompt_stage  # noqa: E402


def ml1m_prompts(n_prompts: int, tokenizer, model: str) -> list[list[int]]:
    """Real ML-1M prompts: the first ``n_prompts`` users of a seeded subset."""
    import pandas as pd

    with tempfile.TemporaryDirectory() as run:  # fresh each time: a folder left by another version would be refused
        run_data_stage(run, DataConfig(dataset="ml-1m", n_users=max(256, n_prompts), seed=0))
        folder = run_prompt_stage(run, PromptConfig(), ModelConfig(name=model)).folder  # its tokenizer truncates
        texts = pd.read_parquet(folder / "prompts.parquet")["text"].tolist()[:n_prompts]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def count(results) -> int:
    return sum(len(c.token_ids) for per_prompt in results for c in per_prompt)


def run_naive(model, tokenizer, prompts, settings) -> tuple[int, float]:
    sampler = HFSampler(model, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    one = SamplerSettings(n_samples=1, temperature=settings.temperature, top_p=settings.top_p,
                          max_new_tokens=settings.max_new_tokens, greedy=False)
    start, tokens = time.perf_counter(), 0
    for i, prompt in enumerate(prompts):
        for s in range(settings.n_samples):
            tokens += count(sampler.sample([prompt], one, batch_generator(0, i * 1000 + s, sampler.device)))
    return tokens, time.perf_counter() - start


def run_batched(sampler_cls, model, tokenizer, prompts, settings, batch_rows) -> tuple[int, float]:
    sampler = sampler_cls(model, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    batches = plan_batches([len(p) for p in prompts], settings.rows_per_prompt, batch_rows, 1 << 30)
    # first calls (CUDA's context and kernels; on CPUs oneDNN's kernels for new shapes) are not sampling: a run
    # samples batch after batch, so each method gets one short warm-up call, then is timed
    sampler.sample(prompts[:2], replace(settings, max_new_tokens=4), batch_generator(0, 0, sampler.device))
    if sampler.device.type == "cuda":
        torch.cuda.synchronize(sampler.device)
    start, tokens = time.perf_counter(), 0
    for number, batch in enumerate(batches):
        tokens += count(sampler.sample([prompts[i] for i in batch], settings, batch_generator(0, number, sampler.device)))
    return tokens, time.perf_counter() - start


def run_llama_cpp(tokenizer, prompts, settings) -> tuple[int, float] | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(packaged_gguf("smollm2-135m")), n_ctx=2048, n_threads=os.cpu_count(), verbose=False, seed=0)
    start, tokens = time.perf_counter(), 0
    for prompt in prompts:
        for _ in range(settings.n_samples):
            out = llm.create_completion(tokenizer.decode(prompt), max_tokens=settings.max_new_tokens,
                                        temperature=settings.temperature, top_p=settings.top_p, top_k=0)
            tokens += out["usage"]["completion_tokens"]
    return tokens, time.perf_counter() - start


def roofline_tokens_per_s(model, rates, prompts, n_samples: int, ours: tuple[int, float] | None) -> dict | None:
    """New tokens per second at this machine's matrix-product rates, for the work ours did (benchmarks/roofline.py).

    Each prompt runs once; each of its N answers passes through every linear layer and the LM head once
    per new token, attending to the prompt and itself (answer lengths: ours' mean).
    """
    if not ours:
        return None
    counter = FlopCounter(model)
    mean_answer = ours[0] / (len(prompts) * n_samples)
    flops: dict[str, float] = {}
    for p in prompts:
        flops = add(flops, counter.prompt_and_answers(len(p), [mean_answer] * n_samples))
    total = sum(flops.values())
    return {"tokens_per_s": ours[0] / seconds_at(flops, rates), "matmul_flops_per_s": rates,
            "flops_per_new_token": total / ours[0], "head_share_of_flops": flops["head"] / total}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer prompts, about a minute")
    parser.add_argument("--prompts", type=int, help="prompts for (b), (c), (d) (default 64; 16 with --quick)")
    parser.add_argument("--naive-prompts", type=int, help="prompts for the naive loop (default 4; 1 with --quick)")
    parser.add_argument("--n", type=int, default=10, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-rows", type=int, default=256, help="rows per batch for ours")
    parser.add_argument("--hf-batch-rows", type=int, default=40, help="rows per batch for model.generate")
    parser.add_argument("--skip", nargs="*", default=[], choices=["naive", "batched", "ours", "llama_cpp"])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto")
    parser.add_argument("--model", default="smollm2-135m", help="the model: the offline default, a GGUF file or a Hugging Face folder")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    n_prompts = args.prompts or (16 if args.quick else 64)
    n_naive = args.naive_prompts or (1 if args.quick else 4)

    device = str(resolve_device(args.device, "--device"))
    tokenizer = load_tokenizer(args.model)
    dtype = best_dtype(device)
    model = load_model(args.model, dtype=dtype, device=device)
    prompts = ml1m_prompts(n_prompts, tokenizer, args.model)
    settings = SamplerSettings(n_samples=args.n, temperature=1.0, top_p=0.9, max_new_tokens=args.max_new_tokens, greedy=False)

    rates_before = measured_rates(model, dtype)  # measured again after the timed work; each kind's best is the limit
    results: dict[str, tuple[int, float] | None] = {}
    ours_runs = []
    if "ours" not in args.skip:
        ours_runs.append(run_batched(FastSampler, model, tokenizer, prompts, settings, args.batch_rows))
    if "batched" not in args.skip:
        results["batched"] = run_batched(HFSampler, model, tokenizer, prompts, settings, args.hf_batch_rows)
        if ours_runs:  # the machine's speed drifts by up to 2x over minutes: time ours on both sides of the long run
            ours_runs.append(run_batched(FastSampler, model, tokenizer, prompts, settings, args.batch_rows))
    if ours_runs:
        results["ours"] = (sum(r[0] for r in ours_runs), sum(r[1] for r in ours_runs))
    if "naive" not in args.skip:
        results["naive"] = run_naive(model, tokenizer, prompts[:n_naive], settings)
    skip_llama = "llama_cpp" in args.skip or device != "cpu" or args.model != "smollm2-135m"  # it runs the packaged GGUF on CPUs
    results["llama_cpp"] = None if skip_llama else run_llama_cpp(tokenizer, prompts, settings)

    rate = {k: (v[0] / v[1] if v else None) for k, v in results.items()}
    ours = rate.get("ours")
    rates = best_rates(rates_before, measured_rates(model, dtype))
    roofline = roofline_tokens_per_s(model, rates, prompts, args.n, ours_runs[0] if ours_runs else None)  # one pass's work
    print(f"\nsampling {n_prompts} ML-1M prompts (mean {sum(map(len, prompts)) / len(prompts):.0f} tokens), "
          f"N = {args.n}, {args.max_new_tokens} new tokens, {args.model}, {dtype} on {device}, {torch.get_num_threads()} threads\n")
    print(f"{'method':<12}{'new tokens':>12}{'seconds':>10}{'tokens/s':>10}{'ours is':>10}")
    for name in ("naive", "batched", "ours", "llama_cpp"):
        if results.get(name) is None:
            print(f"{name:<12}{'-':>12}{'-':>10}{'-':>10}{'-':>10}")
            continue
        tokens, seconds = results[name]
        ratio = f"{ours / rate[name]:.1f}x" if ours and name != "ours" else ""
        print(f"{name:<12}{tokens:>12,}{seconds:>10.1f}{rate[name]:>10.1f}{ratio:>10}")
    if roofline:
        rates = roofline["matmul_flops_per_s"]
        print(f"\nlimit here: {roofline['tokens_per_s']:.0f} tokens/s (matrix products at {rates['layers'] / 1e12:.2f} TFLOP/s on the "
              f"layers' shapes, {rates['head'] / 1e12:.2f} on the LM head's; {roofline['flops_per_new_token'] / 1e9:.2f} GFLOP per new "
              f"token); ours is at {ours / roofline['tokens_per_s']:.0%} of it")
    if args.json:
        payload = {
            "tokens_per_s": rate,
            "roofline_tokens_per_s": roofline["tokens_per_s"] if roofline else None,
            "ours_share_of_roofline": ours / roofline["tokens_per_s"] if roofline and ours else None,
            "roofline": roofline,
            "tokens": {k: (v[0] if v else None) for k, v in results.items()},
            "ours_runs_tokens_per_s": [r[0] / r[1] for r in ours_runs],
            "seconds": {k: (v[1] if v else None) for k, v in results.items()},
            "ratios": {f"ours_vs_{k}": (ours / r if ours and r else None) for k, r in rate.items() if k != "ours"},
            "settings": {"prompts": n_prompts, "naive_prompts": n_naive, "n": args.n, "max_new_tokens": args.max_new_tokens,
                         "dtype": str(dtype), "device": device, "model": args.model, "threads": torch.get_num_threads(),
                         "batch_rows": args.batch_rows,
                         "hf_batch_rows": args.hf_batch_rows},
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
                        "torch": torch.__version__, "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else None},
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
