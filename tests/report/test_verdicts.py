"""The report's three verdicts follow from their intervals: flip an interval and the word flips."""

import copy

from dpo4rec.report.markdown import render, stage_order
from dpo4rec.report.verdicts import verdicts


def crafted(knowledge=(0.01, 0.03), dpo=(-0.01, 0.01), accuracy=(0.54, 0.62), drift=(0.05, 0.14), selected=1) -> dict:
    """A metrics.json as the report stage writes it, with the three intervals given."""
    def comparison(a, b, ci):
        return {"a": a, "b": b, "metric": "map@5", "diff": sum(ci) / 2, "ci95": list(ci)}
    values = {f"{m}@{k}": 0.5 for m in ("map", "ndcg") for k in (1, 3, 5, 7)}
    return {
        "comparisons": [comparison("base_llm", "no_knowledge", knowledge), comparison("dpo_round_1", "base_llm", dpo)],
        "selected_round": selected,
        "alignment": [{"round": 0, "pairs": 400, "optimizer_steps": 50, "heldout_pairs": 700, "heldout_users": 120,
                       "heldout_pair_accuracy": sum(accuracy) / 2, "heldout_pair_accuracy_ci95": list(accuracy),
                       "heldout_reference_accuracy": 0.52, "validation_reward_drift": sum(drift) / 2,
                       "validation_reward_drift_ci95": list(drift)}],
        "arms": {"no_knowledge": values, "base_llm": values, "dpo_round_1": values}, "baselines": {"random": values},
        "test_users": 60, "test_lists": 900, "rounds": [], "reward_drift": [], "train_text": [],
        "config": {"data": {"dataset": "ml-1m", "list_size": 10}, "recommend": {"backbone": "prm", "seeds": 1},
                   "model": {"name": "smollm2-135m"}, "generate": {"n_samples": 4}, "run": {"rounds": 1},
                   "align": {"reward": "listwise", "reward_model": "text_match", "reward_lists": "train", "beta": 0.01}},
    }


def answers(metrics: dict) -> list[str]:
    return [line.split("** ", 1)[1].split(":", 1)[0] for line in verdicts(metrics)]


def test_each_verdict_follows_its_interval():
    assert answers(crafted()) == ["Yes", "Not measurably", "Yes, by both checks"]
    assert answers(crafted(knowledge=(-0.03, -0.01), dpo=(0.001, 0.02))) == ["No, it hurt", "Yes", "Yes, by both checks"]
    assert answers(crafted(knowledge=(-0.01, 0.01), dpo=(-0.02, -0.001))) == ["Not measurably", "No, it hurt", "Yes, by both checks"]
    assert answers(crafted(accuracy=(0.45, 0.55)))[2] == "Partly, by one check of two"
    assert answers(crafted(accuracy=(0.45, 0.55), drift=(-0.02, 0.03)))[2] == "Not measurably"
    assert answers(crafted(accuracy=(0.40, 0.48), drift=(-0.1, -0.02)))[2] == "No, both checks fall below chance"


def test_the_verdicts_open_the_report_with_their_numbers():
    metrics = crafted(selected=0)
    head = render(metrics, [], {}).splitlines()[:15]
    said = [line for line in head if line.startswith("**Did ")]
    assert len(said) == 3
    assert "[+0.0100, +0.0300]" in said[0] and "validation MAP@5 picked KAR over every DPO round" in said[1]
    assert "0.580 [0.540, 0.620]" in said[2] and "starting model alone, before DPO: 0.520" in said[2] and "120 validation users" in said[2]
    flipped = copy.deepcopy(metrics)
    flipped["comparisons"][0]["ci95"] = [-0.03, -0.01]
    assert "**Did knowledge help?** No, it hurt" in render(flipped, [], {})


def test_a_bound_that_rounds_to_zero_keeps_its_sign():
    metrics = crafted(drift=(0.00001, 0.0003))
    assert "[+1.0e-05, +0.0003]" in verdicts(metrics)[2] and answers(metrics)[2] == "Yes, by both checks"


def test_stage_times_come_in_pipeline_order_with_a_total():
    times = {"report": 1.0, "round_1/generate": 3.0, "data": 1.0, "round_0/align": 5.0, "prompts": 1.0, "round_0/generate": 4.0,
             "recommend_no_knowledge": 2.0, "round_0/heldout": 2.0, "round_1/drift": 1.0}
    assert sorted(times, key=stage_order) == ["data", "prompts", "recommend_no_knowledge", "round_0/generate", "round_0/align",
                                              "round_0/heldout", "round_1/generate", "round_1/drift", "report"]
    text = render(crafted(), [], times)
    assert "| **total** | **20.0** (0 min 20 s) |" in text


def test_no_empty_sections():
    assert "raise its own reward" not in render(crafted(), [], {}) and "best minus greedy" not in render(crafted(), [], {})
