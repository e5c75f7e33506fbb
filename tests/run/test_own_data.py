"""A user's own data as most logs look (string ids, odd and very long titles, a declared rating scale), run end to end
with the options a user turns on: KAR's item knowledge (prompts.item_prompts) and recommenders trained on the best
texts (recommend.train_text = "best"). One tiny run serves both checks (slow tier: ~1,600 item texts to generate)."""

import json

import pandas as pd
import pytest
from runhelp import TINY, cli, own_folder

from dpo4rec.stats import paired_bootstrap


@pytest.fixture(scope="module")
def own_run(tmp_path_factory):
    """(run folder, its report's metrics): the tiny config on an own folder, T = 1, item knowledge and best texts on."""
    tmp = tmp_path_factory.mktemp("own")
    folder = own_folder(tmp / "shop")
    run = tmp / "run"
    result = cli("run", "--config", TINY, "--out", run, "--set", f"data.dataset={json.dumps(str(folder))}",
                 "--set", "run.rounds=1", "--set", "data.rating_range=[1, 5]", "--set", "prompts.max_item_chars=200",
                 "--set", "prompts.item_prompts=true", "--set", "recommend.train_text=best")
    assert result.returncode == 0, result.stderr[-3000:]
    return run, json.loads((run / "report" / "metrics.json").read_text())


@pytest.mark.slow
def test_a_folder_with_string_ids_and_odd_titles_runs_end_to_end_with_item_knowledge(own_run):
    run, metrics = own_run
    assert set(metrics["arms"]) == {"no_knowledge", "base_llm", "base_llm_no_item_knowledge", "dpo_round_1"}
    gain = [c for c in metrics["comparisons"] if (c["a"], c["b"], c["metric"]) == ("base_llm", "base_llm_no_item_knowledge", "map@5")]
    arms = [pd.read_parquet(run / "round_0" / "recommend" / name / "test_lists.parquet")  # both on the best texts
            for name in ("prm-best-text", "prm-no-item-knowledge-best-text")]
    diff, ci = paired_bootstrap(arms[0]["user_index"], arms[0]["map@5"], arms[1]["map@5"], seed=0)  # from the written lists
    assert len(gain) == 1 and gain[0]["diff"] == pytest.approx(diff) and gain[0]["ci95"] == pytest.approx(list(ci))
    assert set(metrics["validation_map@5"]) == {"base_llm", "dpo_round_1"}  # the item-knowledge arm is a baseline, not a round
    # KAR's item knowledge: one greedy text per item the run uses, once (round 0), read by every round's encoding
    item_prompts = pd.read_parquet(run / "prompts" / "item_prompts.parquet")
    item_texts = pd.read_parquet(run / "round_0" / "generate" / "item_knowledge.parquet")
    assert sorted(item_texts["item_index"]) == sorted(item_prompts["item_index"]) and (item_texts["text"].str.len() > 0).mean() > 0.9
    assert item_prompts["message"].str.len().max() < 1000  # the 100,000-character title, cut here too
    assert not (run / "round_1" / "generate" / "item_knowledge.parquet").exists()
    for t in (0, 1):
        assert json.loads((run / f"round_{t}" / "encode" / "summary.json").read_text())["item_knowledge_texts"] == len(item_texts)
    assert pd.read_parquet(run / "data" / "users.parquet")["user_id"].str.startswith("u").all()  # the ids as given, beside dense indices
    prompts = json.loads((run / "prompts" / "summary.json").read_text())
    assert prompts["item_texts_cut"] == 1 and prompts["prompt_tokens_max"] <= 256  # the 100,000-character title, cut
    encoded = json.loads((run / "round_0" / "encode" / "summary.json").read_text())
    assert encoded["items_encoded"] < encoded["items"]  # only the items this run's lists and histories hold


@pytest.mark.slow
def test_best_text_run_trains_each_rounds_recommender_on_rewarded_texts(own_run):
    run, metrics = own_run
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


def test_ratings_outside_the_declared_range_are_one_line(tmp_path):
    folder = own_folder(tmp_path / "shop", ratings_scale=20)  # 20-100 "stars"
    result = cli("data", "--config", TINY, "--dataset", folder, "--out", tmp_path / "run")
    assert result.returncode == 0 and "set data.rating_range" in result.stderr  # odd: warned, not refused
    strict = tmp_path / "strict.toml"
    strict.write_text(TINY.read_text().replace("[data]\n", "[data]\nrating_range = [1, 5]\n"))
    refused = cli("data", "--config", strict, "--dataset", folder, "--out", tmp_path / "strict")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "interactions.csv" in refused.stderr and "outside data.rating_range [1, 5]" in refused.stderr
    assert not (tmp_path / "strict").exists()
