"""The report stage: every arm on the test users, with paired bootstrap intervals.

Arms: ``no_knowledge`` (the ID-only backbone), ``base_llm`` (knowledge from
the base LLM: KAR), ``base_llm_no_item_knowledge`` (KAR's item tower on titles and
attributes alone, when the run generated item knowledge), ``dpo_round_t`` (knowledge from the LLM after t DPO
rounds: DPO4Rec). Test-time knowledge is each user's greedy text. The round
to report is picked by validation MAP@5 (next_item: NDCG@10) only; test users decide nothing.
Writes ``RUN/report/``: metrics.json, report.md, tables, PNG plots.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd

from dpo4rec.artifacts import StageFolder, read_json, read_parquet, round_dir, write_json, write_text_atomic
from dpo4rec.config import PipelineConfig, to_dict
from dpo4rec.report import markdown, plots
from dpo4rec.stats import paired_bootstrap

METRICS = [f"{m}@{k}" for k in (1, 3, 5, 7) for m in ("map", "ndcg")]
PROTOCOL_METRICS = {
    # every metric of the table, the two the differences and verdicts show, the one validation picks a round by
    "rerank": {"all": METRICS, "headline": ["map@5", "ndcg@5"], "select": "map@5", "unit": "lists"},
    "next_item": {"all": [f"{m}@{k}" for k in (5, 10, 20) for m in ("hr", "ndcg")], "headline": ["hr@10", "ndcg@10"],
                  "select": "ndcg@10", "unit": "targets"},
}


def arm_folders(run_dir: Path, config: PipelineConfig) -> dict[str, Path]:
    from dpo4rec.recommend import model_name

    reported = replace(config.recommend, knowledge=True)  # trained on greedy or on best texts (recommend.train_text)
    arms = {}
    if config.run.baselines:
        arms["no_knowledge"] = round_dir(run_dir, 0) / "recommend" / model_name(replace(reported, knowledge=False))
    if config.run.baselines and config.prompts.item_prompts:
        arms["base_llm_no_item_knowledge"] = round_dir(run_dir, 0) / "recommend" / model_name(replace(reported, item_knowledge=False))
    arms["base_llm"] = round_dir(run_dir, 0) / "recommend" / model_name(reported)
    for t in range(1, config.run.rounds + 1):
        arms[f"dpo_round_{t}"] = round_dir(run_dir, t) / "recommend" / model_name(reported)
    return arms


def train_text_comparison(run_dir: Path, config: PipelineConfig) -> list[dict]:
    """Per round, the recommender trained on best texts minus the one trained on greedy texts, on validation users
    (what a choice between them may look at) and on test users, MAP@5 and NDCG@5, paired over users."""
    from dpo4rec.recommend import model_name

    if config.recommend.train_text != "best":
        return []
    rows = []
    for t in range(config.run.rounds + 1):
        best, greedy = (round_dir(run_dir, t) / "recommend" / model_name(replace(config.recommend, knowledge=True, train_text=text))
                        for text in ("best", "greedy"))
        rows += [{"round": t, **row} for row in best_minus_greedy(best, greedy, config.data.seed)]
    return rows


def best_minus_greedy(best: Path, greedy: Path, seed: int = 0) -> list[dict]:
    """Two recommender folders' per-list metrics, paired over users, on validation and on test users."""
    rows = []
    for split in ("validation", "test"):
        a, b = (read_parquet(folder / f"{split}_lists.parquet") for folder in (best, greedy))
        for metric in ("map@5", "ndcg@5"):
            diff, ci = paired_bootstrap(a["user_index"].to_numpy(), a[metric].to_numpy(), b[metric].to_numpy(), seed=seed)
            rows.append({"split": split, "metric": metric, "best": float(a[metric].mean()), "greedy": float(b[metric].mean()),
                         "diff": diff, "ci95": list(ci), "users": int(a["user_index"].nunique())})
    return rows


def per_seed_differences(a: pd.DataFrame, b: pd.DataFrame, metric: str) -> dict:
    """``{"per_seed": [a - b with the k-th training of each]}`` when both arms were trained with recommend.seeds > 1."""
    seeds = 1
    while f"{metric}_seed{seeds}" in a.columns and f"{metric}_seed{seeds}" in b.columns:
        seeds += 1
    if seeds == 1:
        return {}
    return {"per_seed": [float(a[f"{metric}_seed{k}"].mean() - b[f"{metric}_seed{k}"].mean()) for k in range(1, seeds)]}


def write_report(run_dir: str | Path, config: PipelineConfig) -> Path:
    """Write ``RUN/report/`` whole or not at all: built under a temporary name, then swapped in for the old one."""
    run_dir = Path(run_dir)
    with StageFolder(run_dir / "report", manifest=None) as out:
        _write_report(run_dir, config, out)
    return run_dir / "report"


def _write_report(run_dir: Path, config: PipelineConfig, out: Path) -> None:
    folders = arm_folders(run_dir, config)
    names = PROTOCOL_METRICS[config.data.protocol]
    lists = {arm: read_parquet(folder / "test_lists.parquet") for arm, folder in folders.items()}
    info = {arm: read_json(folder / "metrics.json") for arm, folder in folders.items()}
    arms = {arm: {m: float(frame[m].mean()) for m in names["all"]} for arm, frame in lists.items()}
    # round 0 (the base LLM) competes too: if no DPO round beats it on validation users, we say so
    validation = {arm: info[arm]["validation"][names["select"]] for arm in folders if arm == "base_llm" or arm.startswith("dpo_round_")}
    dpo_arms = [arm for arm in validation if arm.startswith("dpo_round_")]
    pairs = [("base_llm", "no_knowledge"), ("base_llm", "base_llm_no_item_knowledge"), *[(arm, "base_llm") for arm in dpo_arms]]
    pairs += [(arm, "no_knowledge") for arm in dpo_arms]
    comparisons = []
    for a, b in pairs:
        if a not in lists or b not in lists:
            continue
        assert (lists[a]["user_index"].to_numpy() == lists[b]["user_index"].to_numpy()).all(), "arms must share test lists"
        for metric in names["all"]:
            diff, ci = paired_bootstrap(lists[a]["user_index"].to_numpy(), lists[a][metric].to_numpy(), lists[b][metric].to_numpy(),
                                        seed=config.data.seed)
            comparisons.append({"a": a, "b": b, "metric": metric, "diff": diff, "ci95": list(ci), **per_seed_differences(lists[a], lists[b], metric)})
    rounds = _round_details(run_dir, config)
    drifts = _drift_summaries(run_dir, config)
    metrics = {
        "alignment": alignment(run_dir, config, rounds, drifts),
        "arms": arms,
        "comparisons": comparisons,
        "selected_round": select_round(validation),
        "metric_names": names,
        f"validation_{names['select']}": validation,
        "baselines": info["base_llm"]["baselines"],
        "test_users": int(lists["base_llm"]["user_index"].nunique()),
        "test_lists": len(lists["base_llm"]),
        "rounds": rounds,
        "reward_drift": reward_drift(drifts),  # the drift stages' rows (drift/stage.py)
        "train_text": train_text_comparison(run_dir, config),
        "config": to_dict(config),
    }  # no times here: the same command gives a byte-identical metrics.json (times are in RUN/timings.json)
    write_json(out / "metrics.json", metrics)
    plots.draw(out, metrics)
    timings = read_json(run_dir / "timings.json") if (run_dir / "timings.json").is_file() else {}
    write_text_atomic(out / "report.md", markdown.render(metrics, _examples(run_dir, config), timings))


def select_round(validation: dict[str, float]) -> int:
    """The round whose recommender has the best validation MAP@5 or NDCG@10 (base_llm = round 0, dpo_round_t = t);
    a tie goes to the earlier round, the one with fewer DPO rounds. Test users play no part."""
    rounds = {0 if arm == "base_llm" else int(arm.removeprefix("dpo_round_")): value for arm, value in validation.items()}
    return min(rounds, key=lambda t: (-rounds[t], t))


def _drift_summaries(run_dir: Path, config: PipelineConfig) -> dict[int, dict]:
    """Round t -> what its drift stage wrote (rounds 1..T that have one)."""
    files = {t: round_dir(run_dir, t) / "drift" / "summary.json" for t in range(1, config.run.rounds + 1)}
    return {t: read_json(f) for t, f in files.items() if f.is_file()}


def reward_drift(drifts: dict[int, dict]) -> list[dict]:
    """Every round's train texts under round 0's reward model: round 0's row, then each later round's."""
    rows = {}
    for summary in drifts.values():
        rows.update({row["round"]: row for row in summary["train"]})
    return [rows[t] for t in sorted(rows)]


def alignment(run_dir: Path, config: PipelineConfig, rounds: list[dict], drifts: dict[int, dict]) -> list[dict]:
    """Per DPO round: what it trained on, and whether what it learned carries to validation users (``drifts``: what
    the drift stages wrote, by round)."""
    drift = {s["validation"]["round"]: s["validation"] for s in drifts.values() if s["validation"]}
    entries = []
    for r in rounds[: config.run.rounds]:
        t, dpo = r["round"], r.get("dpo", {})
        heldout_file = round_dir(run_dir, t) / "heldout" / "summary.json"
        heldout = read_json(heldout_file) if heldout_file.is_file() else {}
        reliability = r.get("preferences", {}).get("validation", {}).get("reliability", {})
        probe = r.get("preferences", {}).get("validation", {}).get("reward_probe", {})
        entry = {"round": t, "pairs": dpo.get("pairs"), "optimizer_steps": len(dpo.get("steps", [])),
                 "heldout_pairs": heldout.get("pairs"), "heldout_users": heldout.get("users"),
                 "heldout_pair_accuracy": heldout.get("heldout_pair_accuracy"),
                 "heldout_pair_accuracy_ci95": heldout.get("heldout_pair_accuracy_ci95"),
                 "heldout_best_worst_accuracy": heldout.get("best_worst_accuracy"),
                 "heldout_best_worst_accuracy_ci95": heldout.get("best_worst_accuracy_ci95"),
                 "heldout_margin_mean": heldout.get("margin_mean"), "heldout_margin_ci95": heldout.get("margin_ci95"),
                 # guards (heldout/stage.py): the starting model's own log-prob, no DPO; the margin net of sharpening and length
                 "heldout_reference_accuracy": heldout.get("reference_pair_accuracy"),
                 "heldout_reference_accuracy_ci95": heldout.get("reference_pair_accuracy_ci95"),
                 "heldout_net_accuracy": heldout.get("net_pair_accuracy"),
                 "heldout_net_accuracy_ci95": heldout.get("net_pair_accuracy_ci95"),
                 "validation_reward_drift": drift.get(t, {}).get("validation_reward_drift"),
                 "validation_reward_drift_ci95": drift.get(t, {}).get("validation_reward_drift_ci95"),
                 "validation_users": drift.get(t, {}).get("users"),
                 # the reward's own split-half agreement on these users' lists: what held-out pair accuracy can reach
                 "reward_reliability": reliability.get("pair_agreement"),
                 "reward_reliability_ci95": reliability.get("pair_agreement_ci95"),
                 # a linear probe fitted on the train users' rewards: how much of the preference is shared across users
                 "reward_probe_accuracy": probe.get("pair_accuracy"),
                 "reward_probe_accuracy_ci95": probe.get("pair_accuracy_ci95")}
        entries.append(entry)
    return entries


def _round_details(run_dir: Path, config: PipelineConfig) -> list[dict]:
    details = []
    for t in range(config.run.rounds + 1):
        here = round_dir(run_dir, t)
        entry = {"round": t, "knowledge": read_json(here / "generate" / "summary.json")}
        if (here / "reward" / "summary.json").is_file():
            entry["preferences"] = read_json(here / "reward" / "summary.json")
        if (here / "align" / "training_log.json").is_file():
            log = read_json(here / "align" / "training_log.json")
            entry["dpo"] = {k: v for k, v in log.items() if k != "train_runtime_s"}  # times: RUN/timings.json
        details.append(entry)
    return details


def _examples(run_dir: Path, config: PipelineConfig, n: int = 2) -> list[dict]:
    """A few texts per round for one train user, to see what DPO changed."""
    users = read_parquet(run_dir / "data" / "users.parquet")
    user = int(users.loc[users["split"].astype(str) == "train", "user_index"].iloc[0])
    shown = []
    for t in range(config.run.rounds + 1):
        frame = read_parquet(round_dir(run_dir, t) / "generate" / "knowledge.parquet")
        texts = frame[frame["user_index"] == user].sort_values("sample")
        shown += [{"round": t, "sample": int(r.sample), "text": r.text} for r in texts.head(n + 1).itertuples()]
    return [{"user_index": user, **e} for e in shown]
