"""DPO4Rec end to end on the next-item protocol (SASRec, full ranking), on a user's own folder: the pipeline that
configs/next-item-beauty.toml runs, at the tiny config's size."""

import json

import pandas as pd
import pytest
from runhelp import TINY, cli, own_folder

from dpo4rec.stats import paired_bootstrap

METRICS = {f"{m}@{k}" for m in ("hr", "ndcg") for k in (5, 10, 20)}


def test_next_item_run_on_own_data_reports_sasrec_arms_with_intervals(tmp_path):
    folder = own_folder(tmp_path / "shop")
    run = tmp_path / "run"
    # 800 background users give SASRec enough sequences to rank some test targets in its top 20 within 10 epochs
    result = cli("run", "--config", TINY, "--out", run, "--set", f"data.dataset={json.dumps(str(folder))}",
                 "--set", "run.rounds=1", "--set", "data.protocol=next_item", "--set", "recommend.backbone=sasrec",
                 "--set", "data.background_users=800", "--set", "data.rating_range=[1, 5]",
                 "--set", "data.split=[0.5, 0.1, 0.4]", "--set", "recommend.max_epochs=10")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    folders = {"no_knowledge": run / "round_0" / "recommend" / "sasrec-no-knowledge",
               "base_llm": run / "round_0" / "recommend" / "sasrec", "dpo_round_1": run / "round_1" / "recommend" / "sasrec"}
    assert set(metrics["arms"]) == set(folders)
    lists = {arm: pd.read_parquet(folder / "test_lists.parquet") for arm, folder in folders.items()}
    for arm, folder in folders.items():  # one row per test user, the arm = the SASRec stage's own test metrics
        assert set(metrics["arms"][arm]) == METRICS and len(lists[arm]) == metrics["test_users"] == 16
        assert metrics["arms"][arm] == pytest.approx(json.loads((folder / "metrics.json").read_text())["test"])
        assert metrics["arms"][arm] == pytest.approx({m: lists[arm][m].mean() for m in METRICS})
    assert max(metrics["arms"]["base_llm"].values()) > 0  # some test target in the top 20: the numbers are not all zero
    compared = {(c["a"], c["b"], c["metric"]) for c in metrics["comparisons"]}
    assert compared == {(a, b, m) for a, b in (("base_llm", "no_knowledge"), ("dpo_round_1", "base_llm"),
                                                          ("dpo_round_1", "no_knowledge")) for m in METRICS}
    for c in metrics["comparisons"]:  # recomputed from the arms' written per-user lists
        a, b = lists[c["a"]], lists[c["b"]]
        diff, ci = paired_bootstrap(a["user_index"], a[c["metric"]], b[c["metric"]], seed=0)
        assert c["diff"] == pytest.approx(diff) and c["ci95"] == pytest.approx(list(ci))
    assert set(metrics["validation_ndcg@10"]) == {"base_llm", "dpo_round_1"}  # rounds picked by validation NDCG@10
    [alignment] = metrics["alignment"]
    assert alignment["pairs"] > 0 and alignment["heldout_pairs"] > 0 and alignment["validation_users"] > 0
    assert (run / "round_0" / "align" / "adapter_model.safetensors").is_file()
    users = pd.read_parquet(run / "data" / "users.parquet")
    assert users["user_id"].str.startswith("u").all() and len(users) == 40  # the ids as given; background users get no text
    report = (run / "report" / "report.md").read_text()
    assert "next item, full ranking" in report.splitlines()[2] and "HR@10" in report
