"""Which DPO lever carries to unseen users? Retrain round 0's DPO of a finished run under other settings.

    python experiments/dpo_levers.py RUN OUT --variant NAME KEY=VALUE ... [--variant ...]

For each variant: the run's round-0 samples of its train users are rewarded
and paired again under the variant's [align] settings (``reward_lists``,
``reward``, ``pairing``, ``pairs_per_user``, ``min_reward_gap``), DPO trains
a fresh adapter on them (``learning_rate``, ``epochs``, ``batch_size``, ...),
and the held-out check scores the run's validation pairs (always rewarded on
validation lists by the held-out reward recommender, as the run did) under it;
a variant with another ``reward`` rewards and pairs the validation users'
samples again under it, so the check asks whether DPO learned that reward's
preference. The generation and recommenders are the run's own, so the
variants differ only in what DPO saw (and, with another reward, what counts
as the better text). Writes ``OUT/<variant>/`` (pairs,
adapter, held-out texts) and ``OUT/levers.json``; prints a table.

A variant that keeps the run's reward and pairing settings trains on the run's
own ``pairs.parquet``, and one that keeps the reward but pairs another way
(``pairing``, ``pairs_per_user``, ``min_reward_gap``) pairs the run's own
``rewards.parquet`` again; neither needs embeddings or a recommender (a run
folder brought back from a GPU without its weights will do). ``train_users=K``
(not an [align] field) keeps a seeded subset of K train users' pairs, as a
smaller run would have had; ``--validation-users K`` checks on a seeded subset
of K validation users (the check costs ~6 s per user on a 2-core CPU). ``--model`` / ``--device`` name
the LLM when the run's is not where the run had it (a GPU run continued on a
CPU: the same GGUF file, another path).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from dpo4rec.align.dpo import train_dpo
from dpo4rec.align.heldout import pair_margins, pair_texts, score_texts, summarize
from dpo4rec.align.pairs import make_pairs, reward_spread
from dpo4rec.align.reward_stage import pairing_settings, reward_scorer, split_user_indices
from dpo4rec.config import AlignConfig, ModelConfig, RecommendConfig
from dpo4rec.encode import read_embeddings
from dpo4rec.recommend import reward_model_name


REWARD_SETTINGS = ("recommender", "reward", "reward_lists", "reward_holdout")  # what decides a text's reward


def parse_value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--variant", nargs="+", action="append", required=True, metavar="NAME [KEY=VALUE ...]")
    parser.add_argument("--model", help="the LLM, when not the run's model.name (same weights, another path)")
    parser.add_argument("--device", help="model.device, when not the run's")
    parser.add_argument("--validation-users", type=int, help="check on a seeded subset of this many validation users (default: all)")
    args = parser.parse_args(argv)
    config = json.loads((args.run / "config.json").read_text())
    overrides = {k: v for k, v in (("name", args.model), ("device", args.device)) if v}
    model_cfg = ModelConfig(**{**config["model"], **overrides})
    base_align = AlignConfig(**config["align"])
    recommend = RecommendConfig(**config["recommend"])
    here = args.run / "round_0"
    validation_pairs = pd.read_parquet(here / "preferences" / "validation_pairs.parquet")
    prompts = pd.read_parquet(args.run / "prompts" / "prompts.parquet")
    knowledge = pd.read_parquet(here / "knowledge" / "knowledge.parquet")
    messages = prompts.set_index("user_index")["message"]
    validation_subset = np.random.default_rng(0).permutation(np.unique(validation_pairs["user_index"]))[: args.validation_users or None]
    run_pairing = pairing_settings(base_align, reward_model_name(recommend, base_align.held_out_share))
    results = []
    for name, *settings in args.variant:
        values = {k: parse_value(v) for k, v in (s.split("=", 1) for s in settings)}
        train_users = values.pop("train_users", None)
        align = dataclasses.replace(base_align, **values)
        folder = args.out / name
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        held_out = validation_pairs
        recommender = here / "recommender" / reward_model_name(recommend, align.held_out_share)
        settings_now = pairing_settings(align, recommender.name)
        if settings_now == run_pairing:  # the run's own reward stage: its pairs
            pairs = pd.read_parquet(here / "preferences" / "pairs.parquet")
            rewards = pd.read_parquet(here / "preferences" / "rewards.parquet")
        elif all(settings_now[k] == run_pairing[k] for k in REWARD_SETTINGS):  # the run's rewards, paired another way
            rewards = pd.read_parquet(here / "preferences" / "rewards.parquet").drop(columns="text")
            pairs = make_pairs(rewards, knowledge, prompts, align.min_reward_gap, align.pairing, align.pairs_per_user)
        else:
            embeddings = read_embeddings(here / "embeddings")
            samplers = set(embeddings.user_index[embeddings.sample > 0])
            scorer, lists = reward_scorer(recommender, args.run, align)
            sampled = sorted(samplers & set(split_user_indices(args.run, "train")))
            rewards = scorer.score_embeddings(embeddings, split=lists, users=sampled, reward=align.reward)
            pairs = make_pairs(rewards, knowledge, prompts, align.min_reward_gap, align.pairing, align.pairs_per_user)
        if train_users is not None:  # a seeded subset of the users with pairs: fewer users, as a smaller run would have
            users = np.random.default_rng(0).permutation(np.unique(pairs["user_index"]))[:train_users]
            pairs = pairs[pairs["user_index"].isin(users)].reset_index(drop=True)
            rewards = rewards[rewards["user_index"].isin(users)]
        pairs.to_parquet(folder / "pairs.parquet")
        if args.validation_users:
            held_out = held_out[held_out["user_index"].isin(validation_subset)]
        if align.reward != base_align.reward:
            validation_users = sorted(samplers & set(split_user_indices(args.run, "validation")))
            validation_rewards = scorer.score_embeddings(embeddings, split="validation", users=validation_users, reward=align.reward)
            held_out = make_pairs(validation_rewards, knowledge, prompts, align.min_reward_gap, "all_gaps")
            held_out = held_out[held_out["user_index"].isin(validation_subset)] if args.validation_users else held_out
            held_out.to_parquet(folder / "validation_pairs.parquet")
        history = train_dpo(pairs, model_cfg, align, [], folder / "adapter")
        dpo_s = time.perf_counter() - start
        scored_texts = score_texts(pair_texts(held_out), messages, model_cfg, [folder / "adapter"])
        scored_texts.to_parquet(folder / "heldout_texts.parquet")
        summary = summarize(pair_margins(held_out, scored_texts, align.beta))
        steps = history["steps"]
        summary["validation_pairs"] = summary.pop("pairs")
        row = {"variant": name, "settings": settings, "train_pairs": len(pairs), "optimizer_steps": len(steps),
               "spread": reward_spread(rewards, pairs), "train_reward_accuracy_mean": sum(s["rewards/accuracies"] for s in steps) / max(1, len(steps)),
               "last_loss": steps[-1]["loss"] if steps else None, "dpo_s": round(dpo_s, 1),
               "heldout_s": round(time.perf_counter() - start - dpo_s, 1), **summary}
        results.append(row)
        (args.out / "levers.json").write_text(json.dumps(results, indent=2))
        print(f"{name}: {len(pairs)} pairs, {len(steps)} steps, held-out {summary['heldout_pair_accuracy']:.3f} "
              f"{[round(x, 3) for x in summary['heldout_pair_accuracy_ci95']]}, best-worst {summary['best_worst_accuracy']:.3f}", flush=True)
    print("| variant | settings | pairs | steps | train batch acc. | held-out pair acc. [95% CI] | best vs worst [95% CI] | DPO s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        ci, bw = r["heldout_pair_accuracy_ci95"], r["best_worst_accuracy_ci95"]
        print(f"| {r['variant']} | {' '.join(r['settings'])} | {r['train_pairs']} | {r['optimizer_steps']} | {r['train_reward_accuracy_mean']:.2f} | "
              f"{r['heldout_pair_accuracy']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | {r['best_worst_accuracy']:.3f} [{bw[0]:.3f}, {bw[1]:.3f}] | {r['dpo_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
