"""The report stage: every arm on the test users, with paired bootstrap intervals.

Arms: ``no_knowledge`` (the ID-only backbone), ``base_llm`` (knowledge from
the base LLM: KAR), ``base_llm_no_item_knowledge`` (KAR's item tower on titles and
attributes alone, when the run generated item knowledge), ``dpo_round_t`` (knowledge from the LLM after t DPO
rounds: DPO4Rec). Test-time knowledge is each user's greedy text. The round
to report is picked by validation MAP@5 only; test users decide nothing.
Writes ``RUN/report/``: metrics.json, report.md, tables, PNG plots.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from dpo4rec.artifacts import StageFolder, read_json, read_parquet, round_dir, write_json, write_text_atomic
from dpo4rec.config import PipelineConfig, to_dict
from dpo4rec.stats import paired_bootstrap

METRICS = [f"{m}@{k}" for k in (1, 3, 5, 7) for m in ("map", "ndcg")]


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
    lists = {arm: read_parquet(folder / "test_lists.parquet") for arm, folder in folders.items()}
    info = {arm: read_json(folder / "metrics.json") for arm, folder in folders.items()}
    arms = {arm: {m: float(frame[m].mean()) for m in METRICS} for arm, frame in lists.items()}
    # round 0 (the base LLM) competes too: if no DPO round beats it on validation users, we say so
    validation = {arm: info[arm]["validation"]["map@5"] for arm in folders if arm == "base_llm" or arm.startswith("dpo_round_")}
    dpo_arms = [arm for arm in validation if arm.startswith("dpo_round_")]
    pairs = [("base_llm", "no_knowledge"), ("base_llm", "base_llm_no_item_knowledge"), *[(arm, "base_llm") for arm in dpo_arms]]
    pairs += [(arm, "no_knowledge") for arm in dpo_arms]
    comparisons = []
    for a, b in pairs:
        if a not in lists or b not in lists:
            continue
        assert (lists[a]["user_index"].to_numpy() == lists[b]["user_index"].to_numpy()).all(), "arms must share test lists"
        for metric in METRICS:
            diff, ci = paired_bootstrap(lists[a]["user_index"].to_numpy(), lists[a][metric].to_numpy(), lists[b][metric].to_numpy(),
                                        seed=config.data.seed)
            comparisons.append({"a": a, "b": b, "metric": metric, "diff": diff, "ci95": list(ci), **per_seed_differences(lists[a], lists[b], metric)})
    rounds = _round_details(run_dir, config)
    metrics = {
        "alignment": alignment(run_dir, config, rounds),
        "arms": arms,
        "comparisons": comparisons,
        "selected_round": select_round(validation),
        "validation_map@5": validation,
        "baselines": info["base_llm"]["baselines"],
        "test_users": int(lists["base_llm"]["user_index"].nunique()),
        "test_lists": len(lists["base_llm"]),
        "rounds": rounds,
        "reward_drift": reward_drift(run_dir, config),  # the drift stages' rows (drift/stage.py)
        "train_text": train_text_comparison(run_dir, config),
        "config": to_dict(config),
    }  # no times here: the same command gives a byte-identical metrics.json (times are in RUN/timings.json)
    write_json(out / "metrics.json", metrics)
    _plots(out, metrics)
    timings = read_json(run_dir / "timings.json") if (run_dir / "timings.json").is_file() else {}
    write_text_atomic(out / "report.md", _markdown(metrics, _examples(run_dir, config), timings))


def select_round(validation: dict[str, float]) -> int:
    """The round whose recommender has the best validation MAP@5 (base_llm = round 0, dpo_round_t = t);
    a tie goes to the earlier round, the one with fewer DPO rounds. Test users play no part."""
    rounds = {0 if arm == "base_llm" else int(arm.removeprefix("dpo_round_")): value for arm, value in validation.items()}
    return min(rounds, key=lambda t: (-rounds[t], t))


def _with_ci(entry: dict, key: str, spec: str = ".3f") -> str:
    """``entry[key]`` and its ``key_ci95`` as "value [lo, hi]", or "-" where the round has none."""
    value, ci = entry.get(key), entry.get(f"{key}_ci95")
    return f"{value:{spec}} [{ci[0]:{spec}}, {ci[1]:{spec}}]" if value is not None else "-"


def _drift_summaries(run_dir: Path, config: PipelineConfig) -> dict[int, dict]:
    """Round t -> what its drift stage wrote (rounds 1..T that have one)."""
    files = {t: round_dir(run_dir, t) / "drift" / "summary.json" for t in range(1, config.run.rounds + 1)}
    return {t: read_json(f) for t, f in files.items() if f.is_file()}


def reward_drift(run_dir: Path, config: PipelineConfig) -> list[dict]:
    """Every round's train texts under round 0's reward model: round 0's row, then each later round's."""
    rows = {}
    for summary in _drift_summaries(run_dir, config).values():
        rows.update({row["round"]: row for row in summary["train"]})
    return [rows[t] for t in sorted(rows)]


def alignment(run_dir: Path, config: PipelineConfig, rounds: list[dict]) -> list[dict]:
    """Per DPO round: what it trained on, and whether what it learned carries to validation users."""
    drift = {s["validation"]["round"]: s["validation"] for s in _drift_summaries(run_dir, config).values() if s["validation"]}
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


def _plots(out: Path, metrics: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(metrics["arms"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric in zip(axes, ("map@5", "ndcg@5")):
        values = [metrics["arms"][a][metric] for a in arms]
        errors = [[0, 0] for _ in arms]
        for c in metrics["comparisons"]:
            if c["metric"] == metric and c["b"] == "no_knowledge" and c["a"] in arms:
                i = arms.index(c["a"])
                errors[i] = [c["diff"] - c["ci95"][0], c["ci95"][1] - c["diff"]]
        ax.bar(range(len(arms)), values, yerr=np.array(errors).T, capsize=4, color="#4C72B0")
        ax.set_xticks(range(len(arms)), arms, rotation=20)
        top = max(v + e[1] for v, e in zip(values, errors))
        ax.set_ylim(min(values) - 0.05, top + 0.02)
        ax.set_title(f"test {metric} (bars: 95% CI of the gain over no_knowledge)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "metrics_by_arm.png", dpi=110)
    plt.close(fig)

    checked = [a for a in metrics.get("alignment", []) if a["heldout_pair_accuracy"] is not None]
    if checked:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
        for ax, key, chance, title in ((axes[0], "heldout_pair_accuracy", 0.5, "held-out pair accuracy (chance 0.5)"),
                                       (axes[1], "validation_reward_drift", 0.0, "validation reward drift (next - this round)")):
            shown = [a for a in checked if a[key] is not None]
            x = [a["round"] for a in shown]
            y = [a[key] for a in shown]
            err = np.array([[a[key] - a[f"{key}_ci95"][0], a[f"{key}_ci95"][1] - a[key]] for a in shown]).T.reshape(2, -1)
            ax.errorbar(x, y, yerr=err, fmt="o", capsize=5, color="#C44E52")
            ax.axhline(chance, color="grey", lw=1, ls="--")
            ax.set_xticks(x)
            ax.set_xlabel("DPO round")
            ax.set_title(title + ", 95% CI", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "alignment.png", dpi=110)
        plt.close(fig)

    rounds = [r for r in metrics["rounds"] if "preferences" in r]
    if rounds:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        spread = [r["preferences"]["train"]["spread"]["best_minus_worst_mean"] for r in rounds]
        axes[0].bar([r["round"] for r in rounds], spread, color="#55A868")
        axes[0].set_title("reward spread: best - worst sample, mean over users", fontsize=9)
        axes[0].set_xticks([r["round"] for r in rounds])
        axes[0].set_xlabel("round")
        for r in rounds:
            steps = r.get("dpo", {}).get("steps", [])
            if steps:
                axes[1].plot([s["step"] for s in steps], [s["loss"] for s in steps], label=f"round {r['round']} loss")
                axes[1].plot([s["step"] for s in steps], [s["rewards/accuracies"] for s in steps], "--", label=f"round {r['round']} reward acc.")
        axes[1].set_title("DPO training", fontsize=9)
        axes[1].set_xlabel("step")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "rewards_and_dpo.png", dpi=110)
        plt.close(fig)


def _markdown(metrics: dict, examples: list[dict], timings: dict) -> str:
    lines = ["# dpo4rec report", ""]
    cfg = metrics["config"]
    lines += [f"Data: {cfg['data']['dataset']}, {metrics['test_users']} test users, {metrics['test_lists']} test lists. "
              f"Backbone: {cfg['recommend']['backbone']}. LLM: {cfg['model']['name']}. N = {cfg['generate']['n_samples']}, "
              f"beta = {cfg['align']['beta']}, T = {cfg['run']['rounds']}, {cfg['align']['reward']} rewards "
              f"{'by text matching ' if cfg['align'].get('reward_model') == 'text_match' else ''}on {cfg['align']['reward_lists'].replace('_', '-')} lists. "
              f"Round picked by validation MAP@5: **{metrics['selected_round']}** (0 = the base LLM: no DPO round did better).", ""]
    lines += ["## Did DPO learn something that carries to unseen users? (validation users)", "",
              "Held-out pair accuracy: how often the DPO-trained policy's implicit reward (beta x log-ratio against the "
              "round's starting model) ranks a validation user's chosen text above the rejected one (chance 0.5), over "
              "every two samples whose rewards differ, and over each user's best-vs-worst pair alone; "
              "validation reward drift: the next round's sampled texts minus this round's, both under this round's "
              f"reward model ({cfg['align']['reward']}). Intervals: 95% bootstrap over validation users; they leave out "
              "DPO's own randomness (adapter init, dropout, pair order), which moved the default run's held-out pair "
              "accuracy by about as much as the interval is wide (docs/results.md): run again with another "
              "`--set align.seed=1` (a new --out; earlier stages are the same work) before "
              "reading a small margin over 0.5. Reward reliability: how often the reward itself orders two of a "
              "validation user's texts the same way on two halves of the user's lists (chance 0.5): a reward near 0.5 "
              "makes pairs that are noise, and held-out pair accuracy cannot rise above what it allows "
              "(src/dpo4rec/reward/reliability.py). Two guards: how often the starting model's own log-prob orders the "
              "pairs the reward's way (no DPO at all), and the accuracy of the margin net of sharpening and length (the "
              "log-ratio minus its within-user least-squares fit on that log-prob and the answer's tokens): DPO that only "
              "sharpened the model, or moved it by length, can score above 0.5 when the reward happens to prefer likely "
              "or short texts, and then the net accuracy falls to chance (src/dpo4rec/heldout/stage.py). Linear probe: "
              "the same pairs ordered by a ridge regression from the text's vector and length, fitted on the train "
              "users' rewards: how much of the reward's preference is shared across users at all; a probe above chance "
              "with DPO at chance puts the limit on DPO, not the reward (src/dpo4rec/reward/probe.py).", "",
              "| DPO round | pairs | optimizer steps | held-out pairs (users) | held-out pair accuracy [95% CI] "
              "| best vs worst only [95% CI] | net of sharpening and length [95% CI] | starting model alone [95% CI] "
              "| validation reward drift [95% CI] | reward reliability [95% CI] | linear probe [95% CI] |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for a in metrics["alignment"]:
        lines.append(f"| {a['round']} | {a['pairs']} | {a['optimizer_steps']} | {a['heldout_pairs']} ({a['heldout_users']}) "
                     f"| {_with_ci(a, 'heldout_pair_accuracy')} | {_with_ci(a, 'heldout_best_worst_accuracy')} "
                     f"| {_with_ci(a, 'heldout_net_accuracy')} | {_with_ci(a, 'heldout_reference_accuracy')} "
                     f"| {_with_ci(a, 'validation_reward_drift', '+.4f')} | {_with_ci(a, 'reward_reliability')} "
                     f"| {_with_ci(a, 'reward_probe_accuracy')} |")
    lines += ["", "![alignment](alignment.png)", ""]
    lines += ["## Test metrics (mean over lists)", "", "| arm | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for arm, values in {**metrics["arms"], **{f"({k} ranking)": v for k, v in metrics["baselines"].items()}}.items():
        lines.append(f"| {arm} | " + " | ".join(f"{values[m]:.4f}" for m in METRICS) + " |")
    seeds = metrics["config"]["recommend"].get("seeds", 1)
    noise = ("The intervals resample test users; each arm's recommender is trained once, so they leave out how much a "
             "recommender moves with its training seed (on ML-1M with 2,000 users, ~0.002 MAP@5 standard deviation, and "
             "differences of 0.005 that change sign with the seed: docs/results.md). Check small differences with "
             "`--set recommend.seeds=3` (a new --out)." if seeds == 1 else
             f"Each arm's per-list metrics are the mean of {seeds} trainings of its recommender (recommend.seeds); the intervals "
             "resample test users around that mean. \"per seed\" gives the difference with each seed's pair of trainings: "
             "one that changes sign across seeds is the recommender's training noise, whatever its interval.")
    lines += ["", "## Differences with 95% paired bootstrap intervals over test users", "", noise, "",
              "| a - b | metric | diff | 95% CI |" + (" per seed |" if seeds > 1 else ""), "|---|---|---|---|" + ("---|" if seeds > 1 else "")]
    for c in metrics["comparisons"]:
        if c["metric"] in ("map@5", "ndcg@5"):
            per_seed = f" {', '.join(f'{d:+.4f}' for d in c['per_seed'])} |" if "per_seed" in c else (" - |" if seeds > 1 else "")
            lines.append(f"| {c['a']} - {c['b']} | {c['metric']} | {c['diff']:+.4f} | [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}] |{per_seed}")
    lines += ["", "(all K in metrics.json)", "", "![metrics](metrics_by_arm.png)", ""]
    lines += ["## Rounds", "", "Train users' texts and pairs (lengths in tokens: DPO exploits length first).", "",
              "| round | mean tokens | ended at EOS | pairs | users tied | reward spread (best - worst) | chosen / rejected tokens "
              "| DPO final loss | reward accuracy |", "|---|---|---|---|---|---|---|---|---|"]
    for r in metrics["rounds"]:
        pref, steps = r.get("preferences"), r.get("dpo", {}).get("steps", [])
        spread = pref["train"]["spread"] if pref else {}
        lengths = f"{spread['chosen_tokens_mean']:.1f} / {spread['rejected_tokens_mean']:.1f}" if "chosen_tokens_mean" in spread else "-"
        lines.append(
            f"| {r['round']} | {r['knowledge']['mean_tokens']:.1f} | {r['knowledge']['stopped_at_eos']:.0%} | "
            + (f"{pref['pairs']} | {spread['users_with_tied_samples']} | {spread['best_minus_worst_mean']:.4g} | {lengths} | " if pref else "- | - | - | - | ")
            + (f"{steps[-1]['loss']:.4f} | {steps[-1]['rewards/accuracies']:.2f} |" if steps else "- | - |")
        )
    lines += ["", "![rewards and DPO](rewards_and_dpo.png)", ""]
    if metrics["reward_drift"]:
        lines += ["## Did DPO raise its own reward? (train users, round 0's reward model)", "",
                  "| round | greedy text | sampled texts, mean | sampled - round 0 [95% CI] |", "|---|---|---|---|"]
        for r in metrics["reward_drift"]:
            change = f"{r['sampled_minus_round_0']:+.4f} [{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}]" if "ci95" in r else "-"
            sampled = f"{r['sampled']:.4f}" if "sampled" in r else "- (no train samples)"
            lines.append(f"| {r['round']} | {r['greedy']:.4f} | {sampled} | {change} |")
        lines.append("")
    if metrics.get("train_text"):
        lines += ["## Which text trains the recommender: best minus greedy (recommend.train_text)", "",
                  "The arms above train on each sampled train user's best-rewarded text; beside each, the same recommender "
                  "trained on greedy texts. Validation and test users see their greedy text in both.", "",
                  "| round | users | metric | best | greedy | best - greedy [95% CI] |", "|---|---|---|---|---|---|"]
        for r in metrics["train_text"]:
            lines.append(f"| {r['round']} | {r['split']} ({r['users']}) | {r['metric']} | {r['best']:.4f} | {r['greedy']:.4f} "
                         f"| {r['diff']:+.4f} [{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}] |")
        lines.append("")
    lines += ["## Example texts (one train user)", ""]
    for e in examples:
        kind = "greedy" if e["sample"] == 0 else f"sample {e['sample']}"
        lines.append(f"- round {e['round']}, {kind}: {e['text'][:400]!r}")
    lines += ["", "## Time per stage (seconds)", ""]
    lines += [f"- {k}: {v}" for k, v in timings.items()]
    return "\n".join(lines) + "\n"
