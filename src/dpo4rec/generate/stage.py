"""The generate stage: greedy + N sampled knowledge texts per user, resumable.

Writes ``RUN/round_<t>/generate/``:
* ``plan.json``: the config, the inputs' fingerprints and the batch plan,
  written first; a folder whose plan differs is refused, never overwritten;
* ``parts/part-NNNNN.parquet``: one file per finished batch, each written
  atomically, so a crash or ``kill -9`` loses at most the batch in flight and
  a rerun continues with the next batch (same plan, same seeds, same texts);
* ``knowledge.parquet`` and ``manifest.json`` once every batch is done:
  user_index, sample (0 = greedy, 1..N = sampled), text, n_tokens,
  finish_reason ("stop" at EOS, "length" at max_new_tokens), empty.

Every user gets the greedy text (sample 0: what the recommender trains and
is tested on). N samples go to a seeded subset of train users (the ones DPO
learns from, ``sampled_train_users``) and of validation users (the held-out
check of what DPO learned, ``sampled_validation_users``); test users never
get samples.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from dpo4rec.artifacts import (
    MANIFEST, StageResult, begin_stage, fingerprint_file, manifest_fingerprint, read_json, read_parquet, round_dir, write_json, write_manifest, write_parquet,
)
from dpo4rec.config import GenerateConfig, ModelConfig, to_dict
from dpo4rec.errors import InputError
from dpo4rec.llm import load_model, load_tokenizer, model_device, parse_dtype, resolve_model
from dpo4rec.generate.sampler import SamplerSettings, batch_generator, make_sampler, plan_batches

log = logging.getLogger(__name__)
STAGE = "generate"
ITEM_PROMPTS = "item_prompts.parquet"
ITEM_KNOWLEDGE = "item_knowledge.parquet"  # round 0 only: KAR's factual knowledge, one greedy text per item



def _settings(gen: GenerateConfig, sampled: bool) -> SamplerSettings:
    return SamplerSettings(
        n_samples=gen.n_samples if sampled else 0, temperature=gen.temperature, top_p=gen.top_p,
        max_new_tokens=gen.max_new_tokens, greedy=True, seed=gen.seed, prefill_chunk_tokens=gen.prefill_chunk_tokens,
    )


def sampled_users(users: pd.DataFrame, gen: GenerateConfig) -> np.ndarray:
    """The users who get N samples: seeded subsets of the train and validation users (sorted user indices)."""
    chosen = []
    for stream, (split, count) in enumerate((("train", gen.sampled_train_users), ("validation", gen.sampled_validation_users))):
        rng = np.random.default_rng(np.random.SeedSequence([gen.seed, 7, stream]))  # one stream per split: each subset stays put
        pool = np.sort(users.loc[users["split"].astype(str) == split, "user_index"].to_numpy())
        if count is not None and count > len(pool):
            raise InputError(f"generate.sampled_{split}_users = {count}, but the run has only {len(pool)} {split} users")
        chosen.append(pool if count is None else rng.permutation(pool)[:count])
    return np.sort(np.concatenate(chosen))


def make_plan(prompts: pd.DataFrame, users: pd.DataFrame, gen: GenerateConfig) -> list[dict]:
    """Batches of users, each with whether its users get N samples or only the greedy text."""
    sampled = np.isin(prompts["user_index"].to_numpy(), sampled_users(users, gen))
    plan = []
    for wants_samples in (True, False):
        chosen = prompts[sampled == wants_samples]
        if chosen.empty:
            continue
        rows = _settings(gen, wants_samples).rows_per_prompt
        batches = plan_batches(chosen["n_tokens"].tolist(), rows, gen.batch_rows, gen.max_prefill_tokens)
        users_in_order = chosen["user_index"].to_numpy()
        plan += [{"users": [int(users_in_order[i]) for i in batch], "sampled": wants_samples} for batch in batches]
    return plan


def run_generate_stage(
    run_dir: str | Path, round_index: int, model_cfg: ModelConfig, gen: GenerateConfig,
    adapters=(), stop_after_batches: int | None = None, shard: tuple[int, int] | None = None,
) -> StageResult:
    """Generate (or reuse, or resume) the round's knowledge texts.

    ``adapters``: LoRA folders from earlier rounds' DPO stages, applied together
    (unmerged) to the base model. ``stop_after_batches`` exists for tests of resume.
    ``shard = (i, k)``: one of ``generate.processes`` processes, started by this function: it writes
    the part files of batches i, i + k, ... and leaves the merge to its parent.
    """
    run_dir = Path(run_dir)
    prompt_dir = run_dir / "prompts"
    if not (prompt_dir / MANIFEST).is_file():
        raise InputError(f"{prompt_dir}: no prompts stage output; run `dpo4rec prompts --out {run_dir}` first")
    folder = round_dir(run_dir, round_index) / STAGE
    inputs = {"prompts/manifest.json": manifest_fingerprint(prompt_dir / MANIFEST)}
    for number, adapter in enumerate(map(Path, adapters)):
        if not (adapter / "adapter_model.safetensors").is_file():
            raise InputError(f"adapter not found: {adapter} (no adapter_model.safetensors)")
        inputs[f"adapter_{number}"] = fingerprint_file(adapter / "adapter_model.safetensors")
    config = {"generate": {k: v for k, v in to_dict(gen).items() if k not in GenerateConfig.SPREAD_ONLY},
              "model": {"name": model_cfg.name, "dtype": model_cfg.dtype}}
    manifest, done = begin_stage(folder, STAGE, config, inputs, may_be_partial=True)
    if done:
        return done

    prompts = read_parquet(prompt_dir / "prompts.parquet")
    users = read_parquet(run_dir / "data" / "users.parquet")
    plan = {"config": config, "inputs": inputs, "batches": make_plan(prompts, users, gen)}
    parts = folder / "parts"
    if (folder / "plan.json").is_file():
        old = read_json(folder / "plan.json")
        if old != plan:
            raise InputError(f"{folder} holds an unfinished generation with another config or inputs; remove it or use another --out")
        if shard is None:  # a shard's siblings may be writing their batches right now
            remove_partial_writes(parts)
    else:
        parts.mkdir(parents=True, exist_ok=True)
        write_json(folder / "plan.json", plan)

    todo = [i for i in range(len(plan["batches"])) if not part_file(parts, i).is_file()]
    if shard is not None:
        _generate(prompts, plan["batches"], todo[shard[0]::shard[1]], parts, model_cfg, gen, adapters, None, shard)
        return StageResult(folder, {}, reused=False)
    if len(todo) > 1 and gen.processes > 1 and stop_after_batches is None:
        _generate_in_processes(run_dir, round_index, model_cfg, gen, adapters, min(gen.processes, len(todo)))
        todo = []  # every process finished its share (one that failed raised here)
    if todo:
        _generate(prompts, plan["batches"], todo, parts, model_cfg, gen, adapters, stop_after_batches)
        if stop_after_batches is not None and len(todo) > stop_after_batches:
            return StageResult(folder, {}, reused=False)

    frame = pd.concat([read_parquet(part_file(parts, i)) for i in range(len(plan["batches"]))])
    frame = frame.sort_values(["user_index", "sample"]).reset_index(drop=True)
    summary = summarize(frame)
    item_prompts = prompt_dir / ITEM_PROMPTS
    if round_index == 0 and item_prompts.is_file():  # KAR's item knowledge: once, from the base LLM (DPO aligns only user texts)
        items = generate_item_knowledge(read_parquet(item_prompts), model_cfg, gen, folder / "item_parts")
        write_parquet(folder / ITEM_KNOWLEDGE, items)
        shutil.rmtree(folder / "item_parts")  # item_knowledge.parquet holds them all now
        summary["item_texts"] = len(items)
        summary["item_mean_tokens"] = float(items["n_tokens"].mean())
    write_parquet(folder / "knowledge.parquet", frame)
    write_json(folder / "summary.json", summary)
    write_manifest(folder, manifest, exclude=("parts/",))  # last: marks the stage complete
    shutil.rmtree(parts)  # knowledge.parquet holds them all now
    return StageResult(folder, summary, reused=False)


def part_file(parts: Path, number: int) -> Path:
    """Where batch ``number`` of a plan is kept until the stage merges its batches."""
    return parts / f"part-{number:05d}.parquet"


def remove_partial_writes(parts: Path) -> None:
    """Drop the temporary files of batches that were being written when a process died (files are written atomically)."""
    for stale in parts.glob(".*.tmp"):
        stale.unlink()


def _open_sampler(model_cfg: ModelConfig, gen: GenerateConfig, adapters=()):
    tokenizer = load_tokenizer(model_cfg.name)
    if gen.backend == "vllm":  # vLLM loads the weights itself: no Hugging Face copy of the model beside it
        from transformers import GenerationConfig

        from dpo4rec.generate.vllm_backend import VLLMSampler

        folder = resolve_model(model_cfg.name)
        try:
            extra = GenerationConfig.from_pretrained(folder).eos_token_id
        except OSError:  # a folder without generation_config.json
            extra = None
        eos = [tokenizer.eos_token_id] + list(_as_list(extra))
        return tokenizer, VLLMSampler(folder, list(adapters), eos, model_cfg.dtype), model_cfg.dtype
    device = model_device(model_cfg)
    dtype = parse_dtype(model_cfg.dtype, device)
    model = load_model(model_cfg.name, adapters=adapters, dtype=dtype, device=device)
    eos = [tokenizer.eos_token_id] + list(_as_list(getattr(model.generation_config, "eos_token_id", None)))
    return tokenizer, make_sampler(gen.backend, model, eos, tokenizer.pad_token_id), dtype


def generate_item_knowledge(item_prompts: pd.DataFrame, model_cfg: ModelConfig, gen: GenerateConfig, parts: Path,
                            stop_after_batches: int | None = None) -> pd.DataFrame:
    """One greedy factual text per item prompt: (item_index, text, n_tokens), by item.

    Each batch is written to ``parts/`` as it finishes (atomically), and batches found there are not
    generated again: a crash loses at most the batch in flight (the batches depend only on the item
    prompts and the config, which the stage's plan pins). ``stop_after_batches`` exists for tests of resume.
    """
    parts.mkdir(parents=True, exist_ok=True)
    remove_partial_writes(parts)
    tokenizer = load_tokenizer(model_cfg.name)
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in item_prompts["text"]]
    settings = _settings(gen, sampled=False)
    batches = plan_batches([len(i) for i in ids], settings.rows_per_prompt, gen.batch_rows, gen.max_prefill_tokens)
    part_of = [part_file(parts, number) for number in range(len(batches))]
    todo = [number for number, part in enumerate(part_of) if not part.is_file()][:stop_after_batches]
    if todo:
        _, sampler, _ = _open_sampler(model_cfg, gen)
        with tqdm(total=sum(len(batches[n]) for n in todo), unit="item", desc="item knowledge") as bar:
            for number in todo:
                batch = batches[number]
                completions = sampler.sample([ids[i] for i in batch], settings, batch_generator(gen.seed, number, sampler.device))
                rows = []
                for i, per_item in zip(batch, completions):
                    tokens = per_item[0].token_ids  # the greedy text
                    rows.append({"item_index": int(item_prompts["item_index"].iloc[i]),
                                 "text": tokenizer.decode(tokens, skip_special_tokens=True).strip(), "n_tokens": len(tokens)})
                write_parquet(part_of[number], pd.DataFrame(rows, columns=["item_index", "text", "n_tokens"]))
                bar.update(len(batch))
    done = [read_parquet(part) for part in part_of if part.is_file()]
    frame = pd.concat(done) if done else pd.DataFrame(columns=["item_index", "text", "n_tokens"])
    return frame.sort_values("item_index").reset_index(drop=True)


def _generate_in_processes(run_dir, round_index, model_cfg, gen, adapters, count: int) -> None:
    """``count`` spawned processes, each running this stage as one shard (``shard = (i, count)``)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    gpus = None
    if gen.backend == "vllm" or model_device(model_cfg).startswith("cuda"):
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        model_cfg = replace(model_cfg, device="cuda")  # each process sees its one GPU as cuda:0
    threads = max(1, torch.get_num_threads() // count)
    log.info("generating in %d processes (%s)", count, f"GPUs {', '.join(gpus)}" if gpus else f"{threads} threads each")
    with ProcessPoolExecutor(count, mp_context=multiprocessing.get_context("spawn")) as pool:
        shards = [pool.submit(_run_shard, run_dir, round_index, model_cfg, gen, [str(a) for a in adapters], (i, count),
                              gpus[i % len(gpus)] if gpus else None, threads) for i in range(count)]
        for shard in shards:
            shard.result()  # a shard's error is raised here, after the others have finished


def _run_shard(run_dir, round_index, model_cfg, gen, adapters, shard, gpu, threads) -> None:
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # before this process first touches CUDA
    torch.set_num_threads(threads)
    run_generate_stage(run_dir, round_index, model_cfg, gen, adapters, shard=shard)


def _generate(prompts, batches, todo, parts, model_cfg, gen, adapters, stop_after_batches, shard=None) -> None:
    if not todo:
        return
    tokenizer, sampler, dtype = _open_sampler(model_cfg, gen, adapters)
    text_of = prompts.set_index("user_index")["text"]
    total_users = sum(len(batches[i]["users"]) for i in todo)
    log.info("generating for %d users in %d batches with the %s sampler (%s)", total_users, len(todo), sampler.name, dtype)
    start, new_tokens = time.perf_counter(), 0
    desc = "generate" if shard is None else f"generate {shard[0] + 1}/{shard[1]}"
    with tqdm(total=total_users, unit="user", desc=desc, position=0 if shard is None else shard[0]) as bar:
        for done, number in enumerate(todo):
            if stop_after_batches is not None and done >= stop_after_batches:
                break
            batch = batches[number]
            ids = [tokenizer(text_of[u], add_special_tokens=False)["input_ids"] for u in batch["users"]]
            settings = _settings(gen, batch["sampled"])
            completions = sampler.sample(ids, settings, batch_generator(gen.seed, number, sampler.device))
            rows = []
            for user, per_user in zip(batch["users"], completions):
                for sample, completion in enumerate(per_user):
                    rows.append(completion_row(tokenizer, user, sample, completion))
                    new_tokens += len(completion.token_ids)
            write_parquet(part_file(parts, number), pd.DataFrame(rows))
            bar.update(len(batch["users"]))
            bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - start):.0f}")


def completion_row(tokenizer, user: int, sample: int, completion) -> dict:
    """One row of knowledge.parquet for a sampler's completion (the columns the module docstring lists)."""
    text = tokenizer.decode(completion.token_ids, skip_special_tokens=True).strip()
    return {"user_index": user, "sample": sample, "text": text, "n_tokens": len(completion.token_ids),
            "finish_reason": completion.finish_reason, "empty": not text}


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def summarize(frame: pd.DataFrame) -> dict:
    sampled = frame[frame["sample"] > 0]
    return {
        "users": int(frame["user_index"].nunique()),
        "texts": len(frame),
        "sampled_texts": len(sampled),
        "mean_tokens": float(frame["n_tokens"].mean()),
        "stopped_at_eos": float((frame["finish_reason"] == "stop").mean()),
        "empty_texts": int(frame["empty"].sum()),
        "distinct_sampled_texts_per_user": float(sampled.groupby("user_index")["text"].nunique().mean()) if len(sampled) else 0.0,
    }
