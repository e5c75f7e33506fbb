"""recommend.train_text = "best": each round's reported recommender trains on the train users' best-rewarded texts."""

import json

import pandas as pd
import pytest
from runhelp import TINY, cli

from dpo4rec.stats import paired_bootstrap

pytestmark = pytest.mark.slow


def test_best_text_run_trains_each_rounds_recommender_on_rewarded_texts(tmp_path):
    run = tmp_path / "run"
    result = cli("run", "--config", TINY, "--out", run, "--set", "run.rounds=1", "--set", "recommend.train_text=best")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    for t in (0, 1):
        here = run / f"round_{t}"
        best = json.loads((here / "recommend" / "prm-best-text" / "metrics.json").read_text())["best_text"]
        rewards = pd.read_parquet(here / "reward" / "rewards.parquet")  # the last round scores its train samples too
        assert best["train_users_rewarded"] == rewards["user_index"].nunique() > 0
        assert 0 < best["train_users_not_greedy"] <= best["train_users_rewarded"]  # a continuous reward rarely picks greedy
        assert json.loads((here / "reward" / "summary.json").read_text())["recommender"] == "prm"  # rewards: the greedy model
        assert (here / "recommend" / "prm" / "validation_lists.parquet").is_file()
    # the reported arms are the best-text recommenders, and each is measured against its greedy twin with intervals
    assert json.loads((run / "round_1" / "recommend" / "prm-best-text" / "metrics.json").read_text())["test"]["map@5"] == \
        pytest.approx(metrics["arms"]["dpo_round_1"]["map@5"])
    rows = metrics["train_text"]
    assert {(r["round"], r["split"], r["metric"]) for r in rows} == {(t, s, m) for t in (0, 1) for s in ("validation", "test")
                                                                     for m in ("map@5", "ndcg@5")}
    for r in rows:  # recomputed from the two recommenders' written lists
        best, greedy = (pd.read_parquet(run / f"round_{r['round']}" / "recommend" / name / f"{r['split']}_lists.parquet")
                        for name in ("prm-best-text", "prm"))
        diff, ci = paired_bootstrap(best["user_index"], best[r["metric"]], greedy[r["metric"]], seed=0)
        assert r["diff"] == pytest.approx(r["best"] - r["greedy"]) == pytest.approx(diff) and r["ci95"] == pytest.approx(list(ci))
    assert "best minus greedy" in (run / "report" / "report.md").read_text()
