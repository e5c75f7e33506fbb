"""DPO speed: TRL as shipped against ours, and both against this machine's limit, in one process.

    python benchmarks/dpo.py --quick --json dpo.json     # builds its own pairs; a few minutes
    python benchmarks/dpo.py --pairs RUN/round_0/reward/pairs.parquet --n 32
    python benchmarks/dpo.py --quick --skip trl compact --profile 25     # where ours spends its time

Pairs: real ones, either a reward stage's ``pairs.parquet`` or (``--quick``,
or no file) built here: seeded ML-1M users' prompts (~530 tokens) with two
answers each sampled by our sampler. Every method trains the same LoRA
adapter on the same pairs with the default [align] settings (precomputed
reference log-probs, batch 4 x 2, one epoch):

* ``trl``: TRL's DPOTrainer as shipped (two rows per pair; on a CPU its fused
  LM head projects every position, prompt included);
* ``compact``: as shipped, but the LM head projects only answer positions;
* ``ours``: ``dpo4rec``'s DPO stage (``compact`` plus each pair's prompt
  evaluated once, align/shared_prompt.py), with the attention layout the
  device gets (segments on a CPU, one block-masked call on a GPU);
* ``ours_segments`` / ``ours_mask``: ``ours`` with that layout forced (one of
  them repeats ``ours``; skip it);
* ``ours_pairwise``: ``ours`` with the pairs in TRL's random order, so each
  pair evaluates its own prompt; ``ours`` keeps a user's pairs together and
  evaluates the prompt, and each distinct answer, once for all of them
  (equal to ``ours`` for one pair per user; try a ``top_bottom`` run's pairs);
* ``ours_last_K`` (``--lora-layers K``): ``ours`` with LoRA on the last K
  decoder layers only (``align.lora_layers``): the backward pass stops there,
  and the policy steps start at layer L - K from the hidden states the
  reference pass recorded (align/frozen_layers.py). The limit below assumes
  every layer adapted, so this row may pass it;
* ``ours_last_K_all_layers``: the same without that reuse (every pass runs
  all L layers).

On a GPU (``--device cuda --model FOLDER``, e.g. random-init weights of the
real shapes from benchmarks/gpu_weights.py) the pairs are built with that
model, and the paper's 16 pairs a step can be asked for with
``--batch-size 16 --accumulation 1``.

The limit (``roofline_s_per_pair``): the minimum FLOPs of a pair (reference
forward, policy forward and backward, prompt once, LM head on answer tokens
only) at the matrix-product rates measured here on the model's own shapes,
layers and LM head apart (benchmarks/roofline.py). Seconds per pair are the trainer's (its
optimizer steps); ``stage_s``, the whole DPO call: model loading (cached,
under a second), tokenizing, the reference pass and the trainer.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from roofline import FlopCounter, add, best_rates, measured_rates, seconds_at  # noqa: E402

from dpo4rec.align import dpo  # noqa: E402
from dpo4rec.heldout.stage import completion_ids  # noqa: E402
from dpo4rec.align.shared_prompt import SEGMENT_DEVICES  # noqa: E402
from dpo4rec.config import AlignConfig, ModelConfig  # noqa: E402
from dpo4rec.errors import InputError  # noqa: E402
from dpo4rec.llm import load_model, load_tokenizer, parse_dtype  # noqa: E402


def build_pairs(n_pairs: int, model_name: str = "smollm2-135m", device: str = "cpu") -> pd.DataFrame:
    """``n_pairs`` ML-1M prompts, each with two answers sampled by our sampler (chosen and rejected by sample order)."""
    from dpo4rec.config import DataConfig, PromptConfig
    from dpo4rec.data.stage import run_data_stage
    from dpo4rec.generate.sampler import FastSampler, SamplerSettings, batch_generator
    from dpo4rec.prompts.stage import run_prompt_stage

    with tempfile.TemporaryDirectory() as run:  # fresh each time: a folder left by another version would be refused
        run_data_stage(run, DataConfig(dataset="ml-1m", n_users=max(64, n_pairs), seed=0))
        model_cfg = ModelConfig(name=model_name, device=device)
        prompts = pd.read_parquet(run_prompt_stage(run, PromptConfig(), model_cfg).folder / "prompts.parquet").head(n_pairs)
    tokenizer = load_tokenizer(model_name)
    model = load_model(model_name, dtype=parse_dtype("auto", device), device=device)
    sampler = FastSampler(model, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    settings = SamplerSettings(n_samples=2, temperature=1.0, top_p=0.9, max_new_tokens=64, greedy=False)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in prompts["text"]]
    answers = sampler.sample(ids, settings, batch_generator(0, 0, device))
    texts = [[tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in per_prompt] for per_prompt in answers]
    return pd.DataFrame({"prompt": prompts["message"], "chosen": [t[0] for t in texts], "rejected": [t[1] for t in texts]})


def time_dpo(pairs: pd.DataFrame, align: AlignConfig, compact: bool, model_cfg: ModelConfig,
             segment_devices: tuple[str, ...] | None = None, grouped: bool = True, reuse: bool = True) -> dict:
    import trl.trainer.utils as trl_utils
    from trl import DPOTrainer

    from dpo4rec.align import shared_prompt

    shipped = getattr(trl_utils, "_dpo4rec_shipped", trl_utils._use_triton)
    trl_utils._dpo4rec_shipped = shipped
    # train_dpo installs the compact choice unless it is marked done; "as shipped" keeps TRL's own choice
    trl_utils._use_triton, trl_utils._dpo4rec_compact = shipped, not compact
    shipped_layout = shared_prompt.SEGMENT_DEVICES
    if segment_devices is not None:
        shared_prompt.SEGMENT_DEVICES = segment_devices
    trainer = shared_prompt.SharedPromptDPOTrainer
    if not grouped:  # TRL's random order, the reference pass's too: a user's pairs land in different batches
        pairs = pairs.sample(frac=1.0, random_state=0)
        trainer._get_train_sampler = DPOTrainer._get_train_sampler
    trainer.reuse_frozen_layers = reuse
    try:
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            history = dpo.train_dpo(pairs, model_cfg, align, [], Path(out))
            stage_s = time.perf_counter() - start
    finally:
        shared_prompt.SEGMENT_DEVICES = shipped_layout
        trainer.reuse_frozen_layers = True
        if not grouped:
            del trainer._get_train_sampler
    first = history["steps"][0]
    return {"trainer_s": history["train_runtime_s"], "s_per_pair": history["train_runtime_s"] / len(pairs), "stage_s": stage_s,
            "first_step_loss": first["loss"], "first_step_logps_chosen": first["logps/chosen"]}


def pair_flops(pairs: pd.DataFrame, counter: FlopCounter, tokenizer) -> dict[str, float]:
    """Mean minimum FLOPs per pair, by kind: reference forward + policy forward + policy backward (3 forwards), each
    distinct prompt once with each of its distinct answers once (a user's several pairs share both)."""
    total: dict[str, float] = {}
    for prompt, group in pairs.groupby("prompt", sort=False):
        ids = [completion_ids(tokenizer, prompt, answer) for answer in pd.unique(pd.concat([group["chosen"], group["rejected"]]))]
        one = counter.prompt_and_answers(len(ids[0][0]), [len(answer) for _, answer in ids])
        total = add(total, one, times=3.0 / len(pairs))
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", help="a reward stage's pairs.parquet (default: build pairs here)")
    parser.add_argument("--quick", action="store_true", help="8 pairs built here; a few minutes")
    parser.add_argument("--n", type=int, help="pairs to train on (default 16; 8 with --quick)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["trl", "compact", "ours", "ours_segments", "ours_mask", "ours_pairwise"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:n] (default cpu)")
    parser.add_argument("--model", default="smollm2-135m", help="the LLM: the built-in alias or a Hugging Face folder")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per pass (default 4, the stage's default)")
    parser.add_argument("--accumulation", type=int, default=2, help="passes per optimizer step (default 2)")
    parser.add_argument("--lora-layers", type=int, metavar="K", help="also time ours with LoRA on the last K decoder layers only")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--profile", type=int, metavar="ROWS", help="then train ours once more under the torch profiler "
                        "and print its ROWS costliest operations (self CPU time)")
    args = parser.parse_args(argv)
    n = args.n or (8 if args.quick else 16)
    if args.profile is not None and args.profile < 1:
        print("dpo.py: error: --profile takes the number of operations to print (>= 1)", file=sys.stderr)
        return 2
    if args.pairs and not Path(args.pairs).is_file():
        print(f"dpo.py: error: {args.pairs} not found (a reward stage's pairs.parquet), or leave --pairs out", file=sys.stderr)
        return 2
    try:  # the settings' own checks: one line naming the field, not a traceback
        model_cfg = ModelConfig(name=args.model, device=args.device)
        base = AlignConfig(learning_rate=5e-4, batch_size=args.batch_size, grad_accumulation=args.accumulation)
        top = dataclasses.replace(base, lora_layers=args.lora_layers) if args.lora_layers else None
    except InputError as exc:
        print(f"dpo.py: error: {exc}", file=sys.stderr)
        return 2
    pairs = pd.read_parquet(args.pairs).head(n) if args.pairs and not args.quick else build_pairs(n, args.model, args.device)
    tokenizer = load_tokenizer(args.model)
    dtype = parse_dtype("auto", args.device)
    model = load_model(args.model, dtype=dtype, device=args.device)
    rates_before = measured_rates(model, dtype)  # measured again after the timed work; each kind's best is the limit
    flops = pair_flops(pairs, FlopCounter(model), tokenizer)

    methods = {"trl": (dataclasses.replace(base, shared_prompt=False), False, None, True),
               "compact": (dataclasses.replace(base, shared_prompt=False), True, None, True),
               "ours": (base, True, None, True),
               "ours_segments": (base, True, (torch.device(args.device).type,), True),
               "ours_mask": (base, True, (), True),
               "ours_pairwise": (base, True, None, True)}
    if top is not None:
        methods[f"ours_last_{top.lora_layers}"] = (top, True, None, True)
        methods[f"ours_last_{top.lora_layers}_all_layers"] = (top, True, None, False)
    try:  # e.g. --lora-layers beyond the model's layers, found once it is loaded
        rows = {name: time_dpo(pairs, align, compact, model_cfg, layout, grouped=name != "ours_pairwise", reuse=reuse)
                for name, (align, compact, layout, reuse) in methods.items() if name not in args.skip}
    except InputError as exc:
        print(f"dpo.py: error: {exc}", file=sys.stderr)
        return 2
    rates = best_rates(rates_before, measured_rates(model, dtype))
    roofline = seconds_at(flops, rates)
    threads = torch.get_num_threads()
    print(f"\nDPO on {len(pairs)} pairs, {args.device}, {dtype}, {threads} threads, {base.batch_size} x {base.grad_accumulation} pairs a step; matrix products here: {rates['layers'] / 1e12:.2f} TFLOP/s "
          f"on the layers' shapes, {rates['head'] / 1e12:.2f} on the LM head's; "
          f"limit {roofline:.3g} s per pair\n")
    print("| method | s per pair (trainer) | ours is | share of the limit | DPO call s (reference pass included) | first-step loss |\n|---|---|---|---|---|---|")
    # "ours" is one of the forced layouts on this device: with "ours" skipped, that twin is the reference
    twin = "ours_segments" if torch.device(args.device).type in SEGMENT_DEVICES else "ours_mask"
    reference = "ours" if "ours" in rows else twin
    ours = rows.get(reference, {}).get("s_per_pair")
    for name, row in rows.items():
        speedup = f"{row['s_per_pair'] / ours:.2f}x" if ours else "-"
        print(f"| {name} | {row['s_per_pair']:.3g} | {speedup} | {roofline / row['s_per_pair']:.0%} | {row['stage_s']:.1f} | {row['first_step_loss']:.4f} |")
    if args.json:
        payload = {"s_per_pair": {k: r["s_per_pair"] for k, r in rows.items()}, "roofline_s_per_pair": roofline,
                   "matmul_flops_per_s": rates, "rows": rows, "pairs": len(pairs),
                   "ratios": {f"ours_vs_{k}": r["s_per_pair"] / ours for k, r in rows.items() if ours and k != reference},
                   "settings": {"device": args.device, "model": args.model, "dtype": str(dtype), "threads": threads, "align": dataclasses.asdict(base)},
                   "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                               "torch": torch.__version__}}
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    if args.profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            profiled = time_dpo(pairs, base, True, model_cfg)
        print(f"\nours under the profiler: {profiled['s_per_pair']:.2f} s per pair (profiling adds its own cost)\n")
        print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
