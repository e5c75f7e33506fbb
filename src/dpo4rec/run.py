"""The rounds loop: orchestration only; every stage reads and writes files.

    data -> prompts -> round 0: generate (base LLM) -> encode -> recommend (-> reward recommender) -> reward -> align -> heldout
                    -> round 1: generate (base + adapter 0) -> encode -> drift -> recommend -> ... -> align -> heldout
                    -> round T: generate (base + adapters 0..T-1) -> encode -> drift -> recommend
                    -> report

With ``recommend.train_text = "best"`` every round also trains the recommender
it reports on the train users' best-rewarded texts, after the reward stage
(which the last round then runs too).

Round 0's recommender is the KAR baseline (base-LLM knowledge); round t's is
DPO4Rec after t DPO rounds. Every stage reuses finished output, so a rerun
after a crash, or with a larger T, continues instead of starting over.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

from dpo4rec.artifacts import StageResult, read_json, write_json
from dpo4rec.config import PipelineConfig
from dpo4rec.errors import InputError
from dpo4rec.run_config import record_config

log = logging.getLogger(__name__)


def run_pipeline(config: PipelineConfig, run_dir: str | Path) -> Path:
    """Run (or resume) every stage; returns the report folder."""
    from dpo4rec.align.dpo import adapter_chain, launch_align_stage
    from dpo4rec.data.stage import run_data_stage
    from dpo4rec.drift.stage import run_drift_stage
    from dpo4rec.encode import run_encode_stage
    from dpo4rec.generate.stage import run_generate_stage
    from dpo4rec.heldout.stage import run_heldout_stage
    from dpo4rec.prompts.stage import run_prompt_stage
    from dpo4rec.recommend import run_recommend_stage
    from dpo4rec.report import write_report
    from dpo4rec.reward.stage import run_reward_stage

    run_dir = Path(run_dir)
    check_run_config(config, run_dir)  # refuses another config's folder before any stage runs
    timings_file = run_dir / "timings.json"
    timings: dict[str, float] = read_json(timings_file) if timings_file.is_file() else {}

    def timed(name: str, stage, *args, **kwargs):
        start = time.perf_counter()
        result = stage(*args, **kwargs)
        reused = result.reused if isinstance(result, StageResult) else False  # the report is rebuilt every time
        if not reused:  # keep the time of the run that did the work
            timings[name] = round(time.perf_counter() - start, 2)
            write_json(timings_file, timings)
        log.info("%s: %s", name, "reused" if reused else f"{timings[name]:.1f} s")
        return result

    timed("data", run_data_stage, run_dir, config.data)
    record_config(run_dir, config)  # only now: a run that fails before its first stage leaves nothing behind
    check_sampled_users(config, run_dir)
    timed("prompts", run_prompt_stage, run_dir, config.prompts, config.model)
    greedy = replace(config.recommend, knowledge=True, train_text="greedy")
    best_text = config.recommend.train_text == "best"
    if config.run.baselines:
        timed("recommend_no_knowledge", run_recommend_stage, run_dir, 0, replace(greedy, knowledge=False))
    for t in range(config.run.rounds + 1):
        timed(f"round_{t}/generate", run_generate_stage, run_dir, t, config.model, round_generate_config(config, t),
              adapters=adapter_chain(run_dir, t))
        timed(f"round_{t}/encode", run_encode_stage, run_dir, t, config.encode)
        if t > 0:  # this round's texts under the earlier rounds' rewards
            timed(f"round_{t}/drift", run_drift_stage, run_dir, t, config)
        timed(f"round_{t}/recommend", run_recommend_stage, run_dir, t, greedy)
        if t < config.run.rounds or best_text:  # rewards: for DPO, or for picking the best texts
            if config.trains_reward_recommenders:
                timed(f"round_{t}/recommend_reward", train_reward_recommender, run_dir, t, config)
            timed(f"round_{t}/reward", run_reward_stage, run_dir, t, config.recommend, config.align)
        if best_text:  # the round's reported recommender: train users' best texts
            timed(f"round_{t}/recommend_best_text", run_recommend_stage, run_dir, t, replace(greedy, train_text="best"))
        if t == 0 and config.prompts.item_prompts and config.run.baselines:  # KAR without its item knowledge
            timed("recommend_no_item_knowledge", run_recommend_stage, run_dir, 0,
                  replace(config.recommend, knowledge=True, item_knowledge=False))
        if t < config.run.rounds:
            timed(f"round_{t}/align", launch_align_stage, run_dir, t, config.model, config.align)
            timed(f"round_{t}/heldout", run_heldout_stage, run_dir, t, config.model, config.align, config.data.seed)
    return timed("report", write_report, run_dir, config)


def check_sampled_users(config: PipelineConfig, run_dir: Path) -> None:
    """Refuse sampled subsets larger than the split's users as soon as the split is known (after the data
    stage, seconds in), not when round 0's generation asks for them after the recommenders have trained."""
    from dpo4rec.artifacts import read_parquet
    from dpo4rec.generate.stage import sampled_users

    sampled_users(read_parquet(run_dir / "data" / "users.parquet"), config.generate)


def round_generate_config(config: PipelineConfig, round_index: int):
    """The last round feeds no DPO, so its train users get the greedy text only, unless the recommender trains on their
    best texts (validation users still get N samples: the held-out reward drift compares them with the previous round's)."""
    if round_index == config.run.rounds and config.recommend.train_text != "best":
        return replace(config.generate, sampled_train_users=0)
    return config.generate


def train_reward_recommender(run_dir: str | Path, round_index: int, config: PipelineConfig):
    """The held-out reward's recommender (trained without each train user's last lists); None when rewards use the round's own."""
    from dpo4rec.recommend import run_recommend_stage

    if not config.trains_reward_recommenders:
        return None
    results = [run_recommend_stage(run_dir, round_index, replace(config.recommend, knowledge=True, train_text="greedy"),
                                   reward_holdout=config.align.held_out_share, member=k) for k in range(config.align.reward_seeds)]
    return StageResult(results[0].folder.parent, {"members": [r.summary for r in results]}, all(r.reused for r in results))


def check_run_config(config: PipelineConfig, run_dir: Path) -> None:
    """Refuse settings a DPO run cannot use, and a run folder made with another config, before any stage runs.

    Only ``run.rounds`` (a larger T continues the run) and ``generate.processes`` may differ from the folder's
    ``config.json`` (run_config.py)."""
    if config.generate.n_samples < 2:
        raise InputError(f"generate.n_samples must be >= 2 for a DPO run (best vs worst of N samples), got {config.generate.n_samples}")
    for split in ("train", "validation"):
        if getattr(config.generate, f"sampled_{split}_users") == 0:
            why = "DPO learns from their pairs" if split == "train" else "the report checks what DPO learned on them"
            raise InputError(f"generate.sampled_{split}_users must be >= 1 for a DPO run ({why}), got 0")
    from dpo4rec.devices import resolve_device

    for field, device in (("model.device", config.model.device), ("encode.device", config.encode.device),
                          ("recommend.device", config.recommend.device)):
        resolve_device(device, field)  # CUDA asked for on a machine without it: refused before any stage runs
    if (run_dir / "config.json").is_file():
        record_config(run_dir, config, write=False)
