"""Positive control: does DPO, at a given budget, learn a preference that *can* be learned, and does the check see it?

    python experiments/positive_control.py RUN OUT --variant NAME reward=genre_user KEY=VALUE ... [--variant ...]
        [--validation-users K] [--base-drift]
    python experiments/positive_control.py RUN OUT --summarize --validation-users K   # OUT's variants on K of its users

The run's recommender reward gives DPO nothing that carries to unseen users at
SmolLM2-135M scale (docs/results.md, issue 9). Is that the reward, or would
DPO and the held-out check miss a preference that is there? Here the run's
round-0 samples are rewarded by a transparent rule instead (genre_reward.py):

* ``reward=genre_user``: the genres a text names, each worth its lift for the
  user on the user's reward lists (train users: the held-out lists the run's
  reward used; validation users: their validation lists). User-specific, like
  the recommender's reward, with a direction shared across users;
* ``reward=genre_shared``: the same with every user's lift replaced by the
  mean lift over the sampled train users' reward lists: one preference for all;
* ``reward=recommender``: the run's own reward (``align.reward`` from its
  reward recommender on the texts' sentence embeddings), for comparison
  under the same budget and check; ``recommender_reward=listwise`` picks
  another of the recommender's rewards, ``reward_seeds=K`` the mean over K
  reward recommenders trained with seeds 0..K-1 (experiments/reward_seeds.py),
  ``reward_history=false`` reward recommender(s) trained and scored with every
  list's recent history blanked (the text is their only view of the user);
  ``reward_model=text_match`` the parameter-free text-matching reward
  (``align.reward_model``) on the run's round-0 item vectors instead;
  ``pairs_from=probe`` orders the train pairs by the reward's part that other
  train users share (align/probe.py's ``cross_fitted_scores``: each user's
  round-0 texts scored by a linear probe fitted on the other users' rewards).

For each variant: pairs from the train users' samples (``pairing``, ...),
a fresh DPO adapter (``learning_rate``, ``epochs``, ``batch_size``, ...;
``train_users=K`` keeps a seeded K of them), the held-out check on the
validation users' pairs under the same reward (every two samples whose rewards
differ, as the pipeline's check), and the validation drift: N new samples per
checked validation user from the trained policy minus the run's round-0
samples, both under the same reward (paired 95% interval over users).
Validation users never feed DPO. ``--base-drift`` first resamples the
validation users from the base model with the variants' seed: the drift with
no DPO, which should contain 0 (kept in OUT, and every later variant of OUT
reports it under its own reward). Writes ``OUT/<variant>/`` and
``OUT/control.json`` (a variant of an earlier call on OUT stays unless
rerun by name); prints a table. The run folder is only read.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from dpo_levers import parse_value
from genre_reward import genre_rewards, lifts, mentions
from augmented_reward import run_inputs
from reward_seeds import train_seeds
from dpo4rec.align.dpo import train_dpo
from dpo4rec.align.heldout import pair_margins, pair_texts, score_texts, summarize
from dpo4rec.align.pairs import make_pairs
from dpo4rec.align.probe import cross_fitted_scores
from dpo4rec.align.reward_stage import reward_list_split, round_reward_scorer, split_user_indices
from dpo4rec.config import AlignConfig, EncodeConfig, GenerateConfig, ModelConfig, RecommendConfig
from dpo4rec.encode.cache import EmbeddingCache, cache_key
from dpo4rec.encode import read_embeddings
from dpo4rec.encode.encoder import TextEncoder
from dpo4rec.encode.stage import encode_cached
from dpo4rec.generate.sampler import SamplerSettings, batch_generator, plan_batches
from dpo4rec.generate.stage import _open_sampler, completion_row
from dpo4rec.recommend.reward import EnsembleScorer
from dpo4rec.report.drift import sampled_drift

REWARDS = ("genre_user", "genre_shared", "recommender")


@functools.cache
def ensemble_scorer(run: Path, seeds: int, history: bool = True) -> EnsembleScorer:
    """``seeds`` reward recommenders trained as the run's (once per process: every variant shares them)."""
    run_config, frames, lists, emb, greedy = run_inputs(run, history=history)
    return EnsembleScorer(train_seeds(run_config, frames, lists, emb, greedy, seeds)[0])


def make_reward(kind: str, run: Path, config: dict, align: AlignConfig, knowledge: pd.DataFrame, out: Path, seeds: int = 1,
                history: bool = True):
    """``reward(split, texts) -> user_index, sample, reward`` (split: train or validation; texts: user_index, sample, text).

    ``seeds`` > 1 or ``history=False`` (recommender only): the mean reward of that many reward recommenders trained
    as the run's (seed 0 gives the run's own model again), as experiments/reward_seeds.py, on lists whose recent
    history is blanked when ``history`` is False."""
    if kind == "recommender":  # the run's own: its reward recommender on the texts' sentence embeddings
        encode = EncodeConfig(**config["encode"])
        train_split = reward_list_split(align)
        if align.reward_model == "recommender" and (seeds > 1 or not history):
            scorer = ensemble_scorer(run, seeds, history)
        else:  # the run's own held-out reward recommender, or text matching on round 0's item vectors
            scorer = round_reward_scorer(run, 0, RecommendConfig(**config["recommend"]), dataclasses.replace(align, reward_seeds=1))[0]
        encoder = TextEncoder(encode.encoder, batch_size=encode.batch_size, long_texts=encode.long_texts)
        cache = EmbeddingCache(out / "cache" / cache_key(encoder.name, encode.long_texts), encoder.dim, encoder.name)

        def recommender_reward(split: str, texts: pd.DataFrame) -> pd.DataFrame:
            vectors = encode_cached(encoder, cache, texts["text"].tolist(), progress=False)[0]
            users = texts["user_index"].to_numpy()
            reward = scorer.score(users, vectors, train_split if split == "train" else "validation", 5, align.reward)
            return pd.DataFrame({"user_index": users, "sample": texts["sample"].to_numpy(), "reward": reward})
        return recommender_reward
    lift = lifts(run, align, knowledge)
    if kind == "genre_shared":  # the train users' mean lift, applied to every user
        lift = {split: pd.DataFrame([lift["train"].mean()] * len(table), index=table.index) for split, table in lift.items()}
    return lambda split, texts: genre_rewards(texts, lift[split])


def sample_texts(users: np.ndarray, prompts: pd.DataFrame, model_cfg: ModelConfig, gen: GenerateConfig, adapters: list[Path],
                 seed: int) -> pd.DataFrame:
    """N samples per user from the base model + ``adapters``, through the pipeline's own sampler (unmerged adapters)."""
    tokenizer, sampler, _ = _open_sampler(model_cfg, gen, adapters)
    settings = SamplerSettings(n_samples=gen.n_samples, temperature=gen.temperature, top_p=gen.top_p,
                               max_new_tokens=gen.max_new_tokens, greedy=False, seed=seed)
    text_of = prompts.set_index("user_index")["text"]
    ids = [tokenizer(text_of[u], add_special_tokens=False)["input_ids"] for u in users]
    rows = []
    batches = plan_batches([len(i) for i in ids], settings.rows_per_prompt, gen.batch_rows, gen.max_prefill_tokens)
    with tqdm(total=len(users), unit="user", desc="validation samples") as bar:
        for number, batch in enumerate(batches):
            completions = sampler.sample([ids[i] for i in batch], settings, batch_generator(seed, number, sampler.device))
            for i, per_user in zip(batch, completions):
                rows += [completion_row(tokenizer, int(users[i]), sample, completion) for sample, completion in enumerate(per_user, start=1)]
            bar.update(len(batch))
    return pd.DataFrame(rows)


def within_user_sd(rewards: pd.DataFrame) -> float:
    """Mean over users of the standard deviation of their sampled texts' rewards (each reward's own unit)."""
    return float(rewards[rewards["sample"] > 0].groupby("user_index")["reward"].std().mean())


def describe(texts: pd.DataFrame) -> dict:
    named = mentions(texts["text"])
    return {"genres_named": float(named.sum(1).mean()), "tokens": float(texts["n_tokens"].mean())}


def variant_settings(settings: list[str], base_align: AlignConfig):
    """A variant's KEY=VALUE settings: (reward kind, train_users or None, reward_seeds, reward_history, its AlignConfig,
    whether the probe orders the train pairs)."""
    values = {k: parse_value(v) for k, v in (s.split("=", 1) for s in settings)}
    kind, train_users = values.pop("reward", "genre_user"), values.pop("train_users", None)
    seeds, history = values.pop("reward_seeds", 1), values.pop("reward_history", True)
    probe_pairs = values.pop("pairs_from", "reward") == "probe"
    if "recommender_reward" in values:  # which of the recommender's rewards (align.reward; "reward" names the kind here)
        values["reward"] = values.pop("recommender_reward")
    if kind not in REWARDS:
        raise SystemExit(f"reward must be one of {', '.join(REWARDS)}, got {kind!r}")
    return kind, train_users, seeds, history, dataclasses.replace(base_align, **values), probe_pairs


def summarize_folder(args, config: dict, align: AlignConfig, knowledge: pd.DataFrame, users: np.ndarray) -> int:
    """OUT's finished variants restricted to ``users`` (the same seeded order, fewer users), from their saved files."""
    sampled = knowledge[(knowledge["sample"] > 0) & knowledge["user_index"].isin(users)]
    for row in json.loads((args.out / "control.json").read_text()):
        if "reward" not in row:
            continue
        folder = args.out / row["variant"]
        kind, _, seeds, history, row_align, _ = variant_settings(row["settings"], align)
        reward = make_reward(kind, args.run, config, row_align, knowledge, args.out, seeds, history)
        before = reward("validation", sampled)
        after = pd.read_parquet(folder / "validation_samples.parquet")
        drift = sampled_drift(before, reward("validation", after[after["user_index"].isin(users)]))
        scale = within_user_sd(before)
        line = (f"{row['variant']}: {drift['users']} users, drift / within-user SD {drift['validation_reward_drift'] / scale:+.2f} "
                f"[{drift['validation_reward_drift_ci95'][0] / scale:+.2f}, {drift['validation_reward_drift_ci95'][1] / scale:+.2f}]")
        if (folder / "heldout_texts.parquet").is_file():
            pairs = pd.read_parquet(folder / "validation_pairs.parquet")
            summary = summarize(pair_margins(pairs[pairs["user_index"].isin(users)], pd.read_parquet(folder / "heldout_texts.parquet"), row_align.beta))
            ci = summary["heldout_pair_accuracy_ci95"]
            line += f", held-out pair accuracy {summary['heldout_pair_accuracy']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
        print(line)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--variant", nargs="+", action="append", default=[], metavar="NAME [KEY=VALUE ...]")
    parser.add_argument("--validation-users", type=int, help="check on a seeded subset of this many validation users")
    parser.add_argument("--summarize", action="store_true",
                        help="train nothing: recompute OUT's finished variants' check and drift on --validation-users K")
    parser.add_argument("--base-drift", action="store_true",
                        help="first sample the validation users again from the base model: the drift with no DPO (should be ~0)")
    args = parser.parse_args(argv)
    config = json.loads((args.run / "config.json").read_text())
    model_cfg, gen = ModelConfig(**config["model"]), GenerateConfig(**config["generate"])
    base_align = AlignConfig(**config["align"])
    here = args.run / "round_0"
    prompts = pd.read_parquet(args.run / "prompts" / "prompts.parquet")
    knowledge = pd.read_parquet(here / "knowledge" / "knowledge.parquet")
    sampled = knowledge[knowledge["sample"] > 0]
    messages = prompts.set_index("user_index")["message"]
    validation_users = np.random.default_rng(0).permutation(
        lifts(args.run, base_align, knowledge)["validation"].index.to_numpy())[: args.validation_users or None]
    before_texts = sampled[sampled["user_index"].isin(validation_users)]
    if args.summarize:
        return summarize_folder(args, config, base_align, knowledge, validation_users)
    rerun = {name for name, *_ in args.variant} | ({"base model, no DPO"} if args.base_drift else set())
    record = args.out / "control.json"  # earlier invocations' variants on OUT stay in it
    results = [row for row in json.loads(record.read_text()) if row["variant"] not in rerun] if record.is_file() else []
    if args.base_drift:
        again = sample_texts(np.sort(validation_users), prompts, model_cfg, gen, [], gen.seed + 1000)
        row = {"variant": "base model, no DPO", "before": describe(before_texts), "after": describe(again)}
        for kind in REWARDS:
            reward = make_reward(kind, args.run, config, base_align, knowledge, args.out)
            before = reward("validation", before_texts)
            row[f"drift_{kind}"] = {**sampled_drift(before, reward("validation", again)), "within_user_sd": within_user_sd(before)}
        results.append(row)
        print(json.dumps(results[-1], indent=1), flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        again.to_parquet(args.out / "base_validation_samples.parquet")
        (args.out / "control.json").write_text(json.dumps(results, indent=2))
    for name, *settings in args.variant:
        kind, train_users, seeds, history, align, probe_pairs = variant_settings(settings, base_align)
        folder = args.out / name
        folder.mkdir(parents=True, exist_ok=True)
        reward = make_reward(kind, args.run, config, align, knowledge, args.out, seeds, history)
        rewards = reward("train", sampled[sampled["user_index"].isin(split_user_indices(args.run, "train"))])
        if probe_pairs:  # pairs ordered by the reward's part other train users share (align/probe.py)
            rewards = cross_fitted_scores(read_embeddings(here / "embeddings"), knowledge, rewards)
        pairs = make_pairs(rewards, knowledge, prompts, align.min_reward_gap, align.pairing, align.pairs_per_user)
        if train_users is not None:
            keep = np.random.default_rng(0).permutation(np.unique(pairs["user_index"]))[:train_users]
            pairs = pairs[pairs["user_index"].isin(keep)].reset_index(drop=True)
        before = reward("validation", before_texts)
        held_out = make_pairs(before, knowledge, prompts, 0.0, "all_gaps")
        pairs.to_parquet(folder / "pairs.parquet")
        held_out.to_parquet(folder / "validation_pairs.parquet")
        start = time.perf_counter()
        history = train_dpo(pairs, model_cfg, align, [], folder / "adapter")
        dpo_s = time.perf_counter() - start
        scored = score_texts(pair_texts(held_out), messages, model_cfg, [folder / "adapter"])
        scored.to_parquet(folder / "heldout_texts.parquet")
        summary = summarize(pair_margins(held_out, scored, align.beta))
        heldout_s = time.perf_counter() - start - dpo_s
        after_texts = sample_texts(np.sort(validation_users), prompts, model_cfg, gen, [folder / "adapter"], gen.seed + 1000)
        after_texts.to_parquet(folder / "validation_samples.parquet")
        drift = sampled_drift(before, reward("validation", after_texts))
        drift["within_user_sd"] = within_user_sd(before)  # the drift's scale: how far apart a user's own texts are
        base_samples = args.out / "base_validation_samples.parquet"  # written by --base-drift
        if base_samples.is_file():  # the drift's null under this variant's own reward
            drift["base_drift"] = sampled_drift(before, reward("validation", pd.read_parquet(base_samples)))
        steps = history["steps"]
        row = {"variant": name, "reward": kind, "settings": settings, "train_pairs": len(pairs), "optimizer_steps": len(steps),
               "train_reward_accuracy_mean": sum(s["rewards/accuracies"] for s in steps) / max(1, len(steps)),
               "validation_pairs": summary.pop("pairs"), **summary, **drift,
               "before": describe(before_texts), "after": describe(after_texts), "dpo_s": round(dpo_s, 1),
               "heldout_s": round(heldout_s, 1), "sampling_s": round(time.perf_counter() - start - dpo_s - heldout_s, 1)}
        results.append(row)
        (args.out / "control.json").write_text(json.dumps(results, indent=2))
        print(f"{name}: held-out {row['heldout_pair_accuracy']:.3f} {[round(x, 3) for x in row['heldout_pair_accuracy_ci95']]} "
              f"(net of sharpening and length {row['net_pair_accuracy']:.3f} {[round(x, 3) for x in row['net_pair_accuracy_ci95']]}), "
              f"drift {row['validation_reward_drift']:+.4f} {[round(x, 4) for x in row['validation_reward_drift_ci95']]}"
              + (f", base model's drift {row['base_drift']['validation_reward_drift']:+.4f} "
                 f"{[round(x, 4) for x in row['base_drift']['validation_reward_drift_ci95']]}" if "base_drift" in row else "")
              + f" (within-user SD {row['within_user_sd']:.4f})", flush=True)
    print("| variant | reward | settings | pairs | steps | train batch acc. | held-out pair acc. [95% CI] | net of sharpening "
          "and length [95% CI] | validation drift [95% CI] | drift / within-user SD | genres named, before -> after "
          "| tokens, before -> after | DPO s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results[int(args.base_drift):]:
        ci, nci, dci = r["heldout_pair_accuracy_ci95"], r["net_pair_accuracy_ci95"], r["validation_reward_drift_ci95"]
        print(f"| {r['variant']} | {r['reward']} | {' '.join(r['settings'])} | {r['train_pairs']} | {r['optimizer_steps']} | "
              f"{r['train_reward_accuracy_mean']:.2f} | {r['heldout_pair_accuracy']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | "
              f"{r['net_pair_accuracy']:.3f} [{nci[0]:.3f}, {nci[1]:.3f}] | "
              f"{r['validation_reward_drift']:+.4f} [{dci[0]:+.4f}, {dci[1]:+.4f}] | "
              f"{r['validation_reward_drift'] / r['within_user_sd']:+.2f} | {r['before']['genres_named']:.2f} -> "
              f"{r['after']['genres_named']:.2f} | {r['before']['tokens']:.1f} -> {r['after']['tokens']:.1f} | {r['dpo_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
