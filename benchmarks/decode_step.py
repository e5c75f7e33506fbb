"""One decode step of our sampler, two variants alternating step by step in one warm process.

Whole-benchmark runs minutes apart cannot show a 5-15% change on machines whose speed drifts by up to 2x
between runs; alternating the variants step by step on the same batch can. Variants:

  packed  the decode products on oneDNN-packed bf16 weights (the default on CPUs with bf16) against plain F.linear
  kernel  the prefix attention in our AVX512-BF16 kernel (generate/cpu_kernels.py; the default where it builds)
          against PyTorch's fused CPU kernel
  fused   the prefix attention in PyTorch's fused CPU kernel against plain products and softmax
  fused_ops  the layers' elementwise work (norms, residual adds, rotary, SiLU) in our fused operations
          (generate/cpu_kernels.py) against PyTorch's operations

    python benchmarks/decode_step.py packed 16x10 26x4 25x1      # USERSxROWS: real ML-1M prompts, N rows each
    python benchmarks/decode_step.py kernel 16x10 26x4 104x1 --json F
    python benchmarks/decode_step.py fused 16x10 104x1
    python benchmarks/decode_step.py fused_ops 16x10 26x4 104x1 --prefill

Prints, per shape, the median step time of each variant, the median of the per-step ratios (the other arm's
time / the variant's: above 1, the variant is faster) and the largest logit difference between the two.
With --prefill, also the prefill of each shape's prompts, the two arms alternating (``packed`` and ``fused`` do not
touch the prefill).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from sampling import ml1m_prompts  # noqa: E402

from dpo4rec.generate import cpu_kernels  # noqa: E402
from dpo4rec.generate.fast_llama import DecodeState, FastLlama  # noqa: E402
from dpo4rec.llm import best_dtype, load_model, load_tokenizer  # noqa: E402
from dpo4rec.generate.sampler import pad  # noqa: E402

MODEL = "smollm2-135m"
WARMUP_STEPS = 4  # first calls build oneDNN kernels for new shapes: left out of the medians


def set_arm(fast: FastLlama, variant: str, arm: str, saved: dict) -> None:
    """Switch ``fast`` to the variant ("variant") or to the other arm ("other"); ``saved``: its settings as built."""
    on = arm == "variant"
    if variant == "packed":
        fast.packed_head = saved["packed_head"] if on else None
    if variant == "fused_ops":
        fast.ops = saved["ops"] if on else None
    if variant == "kernel":  # the decode arms differ by their DecodeState; the prefill by this switch
        fast.prompt_kernel = on


def compare_prefill(fast: FastLlama, prompts, pad_id: int, variant: str, repeats: int = 3) -> dict:
    """Time the prefill of ``prompts`` ``repeats`` times per arm, alternating which goes first (after one warm-up each)."""
    ids, mask = pad(prompts, pad_id, left=False)
    lengths = mask.sum(-1)
    saved = {"packed_head": fast.packed_head, "ops": fast.ops}
    times = {"variant": [], "other": []}
    for t in range(repeats + 1):
        for arm in (("variant", "other") if t % 2 == 0 else ("other", "variant")):
            set_arm(fast, variant, arm, saved)
            start = time.perf_counter()
            fast.prefill(ids, lengths)
            if t > 0:
                times[arm].append(time.perf_counter() - start)
    set_arm(fast, variant, "variant", saved)
    return {"prompts": len(prompts), "variant_s": statistics.median(times["variant"]),
            "other_s": statistics.median(times["other"]),
            "median_ratio_other_over_variant": statistics.median(o / v for o, v in zip(times["other"], times["variant"]))}


def compare(fast: FastLlama, prompts, pad_id: int, n: int, variant: str, steps: int) -> dict:
    """Time ``steps`` decode steps of each arm on the same tokens; the arms alternate which goes first."""
    ids, mask = pad(prompts, pad_id, left=False)
    lengths = mask.sum(-1)
    keys, values, first = fast.prefill(ids, lengths)
    saved = {"packed_head": fast.packed_head, "ops": fast.ops}
    if variant in ("packed", "fused_ops"):
        state = DecodeState(keys, values, lengths, n, steps)
        states = {"variant": state, "other": state}  # both write the same suffix entries
    else:
        arms = {"kernel": ("kernel", "flash"), "fused": ("flash", "plain")}[variant]
        states = {arm: DecodeState(keys, values, lengths, n, steps, prefix=mode) for arm, mode in zip(("variant", "other"), arms)}
    tokens = first.argmax(-1)[:, None].expand(len(prompts), n).contiguous()
    times = {"variant": [], "other": []}
    largest = 0.0
    for t in range(steps):
        positions = (lengths + t)[:, None].expand(-1, n)
        logits = {}
        for arm in (("variant", "other") if t % 2 == 0 else ("other", "variant")):
            set_arm(fast, variant, arm, saved)
            states[arm].step = t
            start = time.perf_counter()
            logits[arm] = fast.decode_step(tokens, positions, states[arm])
            times[arm].append(time.perf_counter() - start)
        largest = max(largest, (logits["variant"].float() - logits["other"].float()).abs().max().item())
        tokens = logits["variant"].float().argmax(-1)  # greedy continuation: both arms see the same tokens
    set_arm(fast, variant, "variant", saved)
    ratios = [p / v for p, v in zip(times["other"][WARMUP_STEPS:], times["variant"][WARMUP_STEPS:])]
    return {"users": len(prompts), "rows_per_user": n, "rows": len(prompts) * n,
            "variant_ms": 1e3 * statistics.median(times["variant"][WARMUP_STEPS:]),
            "other_ms": 1e3 * statistics.median(times["other"][WARMUP_STEPS:]),
            "median_ratio_other_over_variant": statistics.median(ratios), "max_logit_difference": largest}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", choices=["packed", "kernel", "fused", "fused_ops"])
    parser.add_argument("shapes", nargs="+", help="USERSxROWS, e.g. 16x10 (16 prompts, 10 rows each)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--prefill", action="store_true", help="also time the prefill of each shape's prompts")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    try:
        shapes = [tuple(int(x) for x in s.lower().split("x")) for s in args.shapes]
        if any(len(s) != 2 or min(s) < 1 for s in shapes) or args.steps < 8:
            raise ValueError
    except ValueError:
        print("decode_step.py: error: shapes are USERSxROWS with both >= 1 (e.g. 16x10), --steps >= 8", file=sys.stderr)
        return 2
    tokenizer = load_tokenizer(MODEL)
    model = load_model(MODEL, dtype=best_dtype("cpu"))
    fast = FastLlama(model)
    if args.variant == "packed" and fast.packed_head is None:
        print("decode_step.py: error: no packed weights on this machine (they need a CPU with bf16 in oneDNN)", file=sys.stderr)
        return 2
    if args.variant in ("kernel", "fused_ops") and (cpu_kernels.compiled() is None or model.dtype != torch.bfloat16):
        print("decode_step.py: error: our CPU kernels do not run here (they need a CPU with AVX512-BF16, "
              "a C++ compiler and bf16)", file=sys.stderr)
        return 2
    other = {"packed": "plain", "kernel": "PyTorch's fused kernel", "fused": "plain",
             "fused_ops": "PyTorch's operations"}[args.variant]
    print(f"\n{args.variant} against {other}, {model.dtype}, {torch.get_num_threads()} threads, {args.steps} steps each "
          f"(the first {WARMUP_STEPS} left out)\n")
    print(f"| users x rows | {args.variant} ms | {other} ms | median per-step ratio ({other} / {args.variant}) | max logit difference |")
    print("|---|---|---|---|---|")
    results, prefills = [], []
    for users, n in shapes:
        prompts = ml1m_prompts(users, tokenizer, MODEL)
        row = compare(fast, prompts, tokenizer.pad_token_id, n, args.variant, args.steps)
        results.append(row)
        print(f"| {users} x {n} = {users * n} | {row['variant_ms']:.1f} | {row['other_ms']:.1f} | "
              f"{row['median_ratio_other_over_variant']:.3f} | {row['max_logit_difference']:.3f} |", flush=True)
        if args.prefill:
            prefills.append(compare_prefill(fast, prompts, tokenizer.pad_token_id, args.variant))
    if prefills:
        print(f"\n| prompts | prefill, {args.variant} s | {other} s | median ratio |\n|---|---|---|---|")
        for row in prefills:
            print(f"| {row['prompts']} | {row['variant_s']:.2f} | {row['other_s']:.2f} | {row['median_ratio_other_over_variant']:.3f} |")
    if args.json:
        payload = {"variant": args.variant, "steps": args.steps, "results": results, "prefill": prefills,
                   "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                               "torch": torch.__version__, "threads": torch.get_num_threads()}}
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
