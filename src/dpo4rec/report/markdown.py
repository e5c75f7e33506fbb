"""report.md: the results section of a paper, from metrics.json alone (plus the stage times and a few example texts).

First screen: the settings in one line, then the three verdicts (verdicts.py). Then the paper-shaped table, the
differences with their intervals, the held-out check, the rounds, examples, stage times; definitions last.
"""

from __future__ import annotations

import math

from dpo4rec.report.verdicts import arm_name, metric_names, verdicts, with_interval

STAGE_ORDER = ["data", "prompts", "generate", "encode", "drift", "recommend_no_knowledge", "recommend", "recommend_reward",
               "reward", "recommend_no_item_knowledge", "recommend_best_text", "align", "heldout", "report"]


def _ci(entry: dict, key: str, spec: str = ".3f") -> str:
    """``entry[key]`` and its ``key_ci95`` as "value [lo, hi]", or "-" where there is none."""
    value, ci = entry.get(key), entry.get(f"{key}_ci95")
    return with_interval(value, ci, spec) if value is not None and ci else "-"


def stage_order(name: str) -> tuple[int, int]:
    """``round_1/align`` -> (1, position of align); data, prompts and the ID-only recommender (it needs no text) first,
    the report last: the order run.py runs them in."""
    round_part, _, stage = name.rpartition("/")
    t = int(round_part.removeprefix("round_")) if round_part else (-1 if stage in ("data", "prompts", "recommend_no_knowledge") else 0)
    if stage == "report":
        t = 10**6
    return t, STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER)


def settings_line(metrics: dict) -> str:
    cfg = metrics["config"]
    dpo = f"DPO beta {cfg['align']['beta']}, T = {cfg['run']['rounds']} round{'s' * (cfg['run']['rounds'] > 1)}."
    scorer = "text matching" if cfg['align'].get('reward_model') == 'text_match' else "the recommender"
    if cfg["data"].get("protocol") == "next_item":
        return (f"{cfg['data']['dataset']}, {metrics['test_users']} test users (next item, full ranking, leave-one-out); "
                f"{cfg['recommend']['backbone'].upper()}; LLM {cfg['model']['name']}; N = {cfg['generate']['n_samples']} texts per user, "
                f"{cfg['align']['reward']} reward from {scorer} on each train user's validation target; {dpo}")
    return (f"{cfg['data']['dataset']}, {metrics['test_users']} test users ({metrics['test_lists']} lists of "
            f"{cfg['data']['list_size']}); re-ranker {cfg['recommend']['backbone'].upper()}; LLM {cfg['model']['name']}; "
            f"N = {cfg['generate']['n_samples']} texts per user, {cfg['align']['reward']} reward from {scorer.replace('recommender', 're-ranker')} "
            f"on {cfg['align']['reward_lists'].replace('_', '-')} lists; {dpo}")


def render(metrics: dict, examples: list[dict], timings: dict) -> str:
    lines = ["# DPO4Rec report", "", settings_line(metrics), ""]
    for verdict in verdicts(metrics):
        lines += [verdict, ""]
    lines += _test_table(metrics) + _differences(metrics) + _alignment(metrics) + _rounds(metrics)
    lines += _reward_drift(metrics) + _train_text(metrics) + _examples(examples) + _times(timings) + _glossary(metrics)
    return "\n".join(lines).rstrip() + "\n"


def _test_table(metrics: dict) -> list[str]:
    picked, names = metrics["selected_round"], metric_names(metrics)
    header = "| | " + " | ".join(m.upper() for m in names["all"]) + " |"
    note = ("MAP@1 equals NDCG@1 (one relevant slot)." if names["unit"] == "lists" else
            "One target per test user, ranked among every item the user had not interacted with, ties against it.")
    lines = [f"## Test metrics (mean over test {names['unit']})", "",
             f"DPO4Rec round t: the LLM after t DPO rounds. * = the round validation {names['select'].upper()} picked (round 0 is KAR). "
             + note, "", header, "|---|" + "---|" * len(names["all"])]
    for arm, values in metrics["arms"].items():
        star = " *" if arm == f"dpo_round_{picked}" or (picked == 0 and arm == "base_llm") else ""
        lines.append(f"| {arm_name(arm)}{star} | " + " | ".join(f"{values[m]:.4f}" for m in names["all"]) + " |")
    for name, values in metrics["baselines"].items():
        lines.append(f"| ({name} ranking) | " + " | ".join(f"{values[m]:.4f}" for m in names["all"]) + " |")
    return lines + [""]


def _differences(metrics: dict) -> list[str]:
    seeds = metrics["config"]["recommend"].get("seeds", 1)
    noise = ("Each arm's recommender is trained once, so the intervals leave out how much a recommender moves with its "
             "training seed (~0.002 MAP@5 on ML-1M; docs/results.md): check a small difference with "
             "`--set recommend.seeds=3` (a new --out)." if seeds == 1 else
             f"Each arm's per-list metrics are the mean of {seeds} trainings (recommend.seeds); \"per seed\" gives the "
             "difference with each seed's pair of trainings: one that changes sign is training noise, whatever its interval.")
    lines = ["## Differences (95% paired bootstrap intervals over test users)", "", noise, "",
             "![differences](differences.png)", "",
             "| a - b | metric | difference [95% CI] |" + (" per seed |" if seeds > 1 else ""),
             "|---|---|---|" + ("---|" if seeds > 1 else "")]
    for c in metrics["comparisons"]:
        if c["metric"] in metric_names(metrics)["headline"]:
            per_seed = f" {', '.join(f'{d:+.4f}' for d in c['per_seed'])} |" if "per_seed" in c else (" - |" if seeds > 1 else "")
            lines.append(f"| {arm_name(c['a'])} - {arm_name(c['b'])} | {c['metric'].upper()} | {c['diff']:+.4f} "
                         f"[{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}] |{per_seed}")
    return lines + ["", "(every K in metrics.json)", ""]


def _alignment(metrics: dict) -> list[str]:
    if not metrics["alignment"]:
        return []
    lines = ["## Did DPO learn the reward on users it never saw? (validation users)", "",
             "DPO round k trains on round k-1's texts and writes round k's. Validation users never reach DPO, and no "
             "recommender trains on what they are scored on (next item: their earlier items train SASRec, their "
             "validation targets never). Definitions: the glossary below.", "",
             "| DPO round | pairs | steps | held-out pairs (users) | held-out pair accuracy | best vs worst only "
             "| net of sharpening and length | starting model alone | validation drift | reward reliability | linear probe |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for a in metrics["alignment"]:
        lines.append(f"| {a['round'] + 1} | {a['pairs']} | {a['optimizer_steps']} | {a['heldout_pairs']} ({a['heldout_users']}) "
                     f"| {_ci(a, 'heldout_pair_accuracy')} | {_ci(a, 'heldout_best_worst_accuracy')} "
                     f"| {_ci(a, 'heldout_net_accuracy')} | {_ci(a, 'heldout_reference_accuracy')} "
                     f"| {_ci(a, 'validation_reward_drift', '+.4f')} | {_ci(a, 'reward_reliability')} "
                     f"| {_ci(a, 'reward_probe_accuracy')} |")
    return lines + ["", "![alignment](alignment.png)", ""]


def _rounds(metrics: dict) -> list[str]:
    lines = ["## Rounds (train users' texts and DPO pairs)", "",
             "| texts of round | mean tokens | ended at EOS | pairs | users tied | reward spread (best - worst) "
             "| chosen / rejected tokens | DPO round | DPO loss, last 10 steps (ln 2 = 0.693 at the start) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in metrics["rounds"]:
        pref, steps = r.get("preferences"), r.get("dpo", {}).get("steps", [])
        spread = pref["train"]["spread"] if pref else {}
        lengths = f"{spread['chosen_tokens_mean']:.1f} / {spread['rejected_tokens_mean']:.1f}" if "chosen_tokens_mean" in spread else "-"
        tail = [s["loss"] for s in steps[-10:]]
        lines.append(
            f"| {r['round']} | {r['knowledge']['mean_tokens']:.1f} | {r['knowledge']['stopped_at_eos']:.0%} | "
            + (f"{pref['train']['pairs']} | {spread['users_with_tied_samples']} | {spread['best_minus_worst_mean']:.4g} | {lengths} | "
               if pref else "- | - | - | - | ")
            + (f"{r['round'] + 1} | {sum(tail) / len(tail):.4f} |" if tail else "- | - |"))
    return lines + ["", "![DPO loss](rewards_and_dpo.png)", "",
                    "DPO's loss on its own training pairs starts at ln 2 = 0.693; below it, the policy prefers the chosen "
                    "texts it trained on. With beta = 0.01 it moves little even when the held-out checks above move: "
                    "those, not this loss, say whether DPO learned what carries to other users.", ""]


def _reward_drift(metrics: dict) -> list[str]:
    rows = [r for r in metrics["reward_drift"] if "ci95" in r]
    if not rows:
        return []
    lines = ["## Did DPO raise its own reward? (train users, under round 0's reward)", "",
             "| texts of round | greedy text | sampled texts, mean | sampled - round 0 [95% CI] |", "|---|---|---|---|"]
    for r in metrics["reward_drift"]:
        change = f"{r['sampled_minus_round_0']:+.4f} [{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}]" if "ci95" in r else "-"
        sampled = f"{r['sampled']:.4f}" if "sampled" in r else "- (the last round samples no train users)"
        lines.append(f"| {r['round']} | {r['greedy']:.4f} | {sampled} | {change} |")
    return lines + [""]


def _train_text(metrics: dict) -> list[str]:
    if not metrics.get("train_text"):
        return []
    lines = ["## Which text trains the recommender: best minus greedy (recommend.train_text)", "",
             "The arms above train on each sampled train user's best-rewarded text; beside each, the same recommender "
             "trained on greedy texts. Validation and test users see their greedy text in both.", "",
             "| round | users | metric | best | greedy | best - greedy [95% CI] |", "|---|---|---|---|---|---|"]
    for r in metrics["train_text"]:
        lines.append(f"| {r['round']} | {r['split']} ({r['users']}) | {r['metric']} | {r['best']:.4f} | {r['greedy']:.4f} "
                     f"| {r['diff']:+.4f} [{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}] |")
    return lines + [""]


def _examples(examples: list[dict]) -> list[str]:
    if not examples:
        return []
    lines = [f"## Example texts (train user {examples[0]['user_index']})", "",
             "As the LLM wrote them, uncorrected: a small model invents names and facts (directors, actors) that the "
             "prompt never held; only the recommender's use of the text is measured above.", ""]
    for e in examples:
        kind = "greedy" if e["sample"] == 0 else f"sample {e['sample']}"
        lines.append(f"- round {e['round']}, {kind}: {e['text'][:400]!r}")
    return lines + [""]


def _times(timings: dict) -> list[str]:
    if not timings:
        return []
    ordered = sorted(timings, key=stage_order)
    total = sum(timings.values())
    lines = ["## Time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {timings[name]:.1f} |" for name in ordered]
    return lines + [f"| **total** | **{total:.1f}** ({math.floor(total / 60)} min {total % 60:.0f} s) |", ""]


def _glossary(metrics: dict) -> list[str]:
    reward = metrics["config"]["align"]["reward"]
    return ["## Glossary", "",
            "- **w/o knowledge, KAR, DPO4Rec round t**: the same re-ranker without user texts, with the base LLM's texts "
            "(KAR), and with the texts of the LLM after t DPO rounds. Test users see their greedy text. The round to "
            f"report is picked by validation {metric_names(metrics)['select'].upper()}; test users decide nothing.",
            "- **95% paired bootstrap interval**: test (or validation) users resampled 2,000 times, each with all of "
            "their lists; a difference is measurable when its interval leaves out 0.",
            "- **held-out pair accuracy**: how often the DPO-trained policy's implicit reward (beta x log-ratio against "
            "the round's starting model) ranks a validation user's better-rewarded text above the worse one, over "
            "every two sampled texts whose rewards differ (chance 0.5); **best vs worst only**: each user's widest pair.",
            "- **starting model alone**: the same pairs ordered by the starting model's own log-prob, no DPO at all: "
            "above 0.5, the model already preferred what the reward prefers before DPO.",
            "- **net of sharpening and length**: the log-ratio minus its within-user least-squares fit on the starting "
            "model's log-prob and the text's tokens: what DPO learned beyond making likely or short texts likelier.",
            f"- **validation drift**: the next round's sampled validation texts minus this round's, both under this "
            f"round's reward ({reward}); a rise means DPO moved unseen users' texts the reward's way.",
            "- **reward reliability**: how often the reward orders two of a validation user's texts alike on two halves "
            "of the user's lists (chance 0.5); held-out pair accuracy cannot rise above what it allows.",
            "- **linear probe**: the same pairs ordered by a ridge regression from a text's vector and length, fitted on "
            "the train users' rewards: how much of the reward's preference is shared across users at all.",
            "- These intervals leave out DPO's own randomness (adapter init, pair order): rerun with "
            "`--set align.seed=1` (a new --out) before reading a small margin.", ""]
