"""The report's three questions, each answered in words that follow from its interval (never written by hand).

1. Did knowledge help? KAR (the base LLM's texts) minus the ID-only backbone, test MAP@5 (next_item: HR@10).
2. Did DPO help? DPO4Rec (the round validation picked; round 1 when it picked the base LLM) minus KAR, test MAP@5 (HR@10).
3. Did DPO learn the reward on users it never saw? DPO round 1's held-out pair accuracy (chance 0.5) and validation
   drift (chance 0), with the starting model's own pair accuracy beside them.
"""

from __future__ import annotations

ARM_NAMES = {"no_knowledge": "w/o knowledge", "base_llm": "KAR", "base_llm_no_item_knowledge": "KAR w/o item knowledge"}


def arm_name(arm: str) -> str:
    """The paper's names: w/o knowledge, KAR, DPO4Rec round t (after t DPO rounds)."""
    return ARM_NAMES.get(arm) or f"DPO4Rec round {arm.removeprefix('dpo_round_')}"


def above(ci: list[float] | None, chance: float) -> bool | None:
    """True when the interval lies above ``chance``, False when below, None when it holds it (or there is none)."""
    if not ci:
        return None
    return True if ci[0] > chance else False if ci[1] < chance else None


RERANK_NAMES = {"all": [f"{m}@{k}" for m in ("map", "ndcg") for k in (1, 3, 5, 7)], "headline": ["map@5", "ndcg@5"], "select": "map@5", "unit": "lists"}


def metric_names(metrics: dict) -> dict:
    """The protocol's metrics (report.PROTOCOL_METRICS), in table order: the re-rank ones for reports made before them."""
    names = dict(metrics.get("metric_names") or RERANK_NAMES)
    names["all"] = sorted(names["all"], key=lambda m: (m.split("@")[0] == "ndcg", int(m.split("@")[1])))  # MAP or HR first, then NDCG
    return names

def _difference(metrics: dict, a: str, b: str, metric: str | None = None) -> dict | None:
    metric = metric or metric_names(metrics)["headline"][0]
    return next((c for c in metrics["comparisons"] if (c["a"], c["b"], c["metric"]) == (a, b, metric)), None)


def _word(direction: bool | None, yes: str, no: str, unclear: str) -> str:
    return yes if direction is True else no if direction is False else unclear


def number(value: float, spec: str) -> str:
    """``value`` in ``spec``, or in scientific notation where ``spec`` would round a nonzero value to zero (a bound
    printed as +0.0000 would hide which side of zero it lies on)."""
    text = format(value, spec)
    return format(value, "+.1e" if "+" in spec else ".1e") if value != 0 and float(text) == 0 else text


def with_interval(value: float, ci: list[float], spec: str) -> str:
    """"0.594 [0.551, 0.636]": a value and its interval, each through ``number``."""
    return f"{number(value, spec)} [{number(ci[0], spec)}, {number(ci[1], spec)}]"


def verdicts(metrics: dict) -> list[str]:
    """Three markdown lines, each a question, its answer, and the number with its 95% interval."""
    lines = []
    headline, select = metric_names(metrics)["headline"][0].upper(), metric_names(metrics)["select"].upper()
    knowledge = _difference(metrics, "base_llm", "no_knowledge")
    if knowledge:
        answer = _word(above(knowledge["ci95"], 0), "Yes", "No, it hurt", "Not measurably")
        lines.append(f"**Did knowledge help?** {answer}: KAR - w/o knowledge, test {headline} "
                     f"{with_interval(knowledge['diff'], knowledge['ci95'], '+.4f')}.")
    t = metrics["selected_round"] or 1
    dpo = _difference(metrics, f"dpo_round_{t}", "base_llm")
    if dpo:
        answer = _word(above(dpo["ci95"], 0), "Yes", "No, it hurt", "Not measurably")
        picked = (f"the round validation {select} picked" if metrics["selected_round"]
                  else f"validation {select} picked KAR over every DPO round")
        lines.append(f"**Did DPO help?** {answer}: DPO4Rec round {t} - KAR, test {headline} {with_interval(dpo['diff'], dpo['ci95'], '+.4f')} ({picked}).")
    checked = next((a for a in metrics.get("alignment", []) if a["round"] == 0), None)
    if checked and checked.get("heldout_pair_accuracy") is not None:
        accuracy = above(checked["heldout_pair_accuracy_ci95"], 0.5)
        drift = above(checked.get("validation_reward_drift_ci95"), 0.0)
        answer = ("Yes, by both checks" if accuracy and drift else "No, both checks fall below chance" if accuracy is False and drift is False
                  else "Partly, by one check of two" if accuracy or drift else "Not measurably")
        parts = [f"held-out pair accuracy {with_interval(checked['heldout_pair_accuracy'], checked['heldout_pair_accuracy_ci95'], '.3f')} (chance 0.5"]
        if checked.get("heldout_reference_accuracy") is not None:
            parts[0] += f"; the starting model alone, before DPO: {checked['heldout_reference_accuracy']:.3f}"
        parts[0] += ")"
        if checked.get("validation_reward_drift") is not None:
            parts.append(f"validation drift {with_interval(checked['validation_reward_drift'], checked['validation_reward_drift_ci95'], '+.4f')} (chance 0)")
        lines.append(f"**Did DPO learn the reward on users it never saw?** {answer}: DPO round 1 on "
                     f"{checked['heldout_users']} validation users, {', '.join(parts)}.")
    elif checked:
        lines.append("**Did DPO learn the reward on users it never saw?** Not checked: no validation pairs (every sampled "
                     "validation user's texts tied).")
    return lines
