"""The whole pipeline on configs/tiny.toml: end to end, and killed then resumed."""

import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from runhelp import ENV, TINY, cli

from dpo4rec.cli import main
from dpo4rec.stats import paired_bootstrap


def test_tiny_run_reports_every_arm_with_intervals(uninterrupted):  # the fast tier's one end-to-end run
    run, metrics = uninterrupted
    assert set(metrics["arms"]) == {"no_knowledge", "base_llm", "dpo_round_1", "dpo_round_2"}
    for values in metrics["arms"].values():
        assert set(values) == {f"{m}@{k}" for m in ("map", "ndcg") for k in (1, 3, 5, 7)}
        assert all(0 <= v <= 1 for v in values.values())
    compared = {(c["a"], c["b"]) for c in metrics["comparisons"]}
    assert ("dpo_round_1", "base_llm") in compared and ("base_llm", "no_knowledge") in compared
    lists = {arm: pd.read_parquet(run / f"round_{t}" / "recommend" / name / "test_lists.parquet")
             for arm, t, name in (("base_llm", 0, "prm"), ("dpo_round_1", 1, "prm"), ("dpo_round_2", 2, "prm"),
                                  ("no_knowledge", 0, "prm-no-knowledge"))}
    assert {c["a"] for c in metrics["comparisons"]} | {c["b"] for c in metrics["comparisons"]} <= set(lists)
    for c in metrics["comparisons"]:  # recomputed from the arms' written test lists (the bootstrap's math: tests/report)
        a, b = lists[c["a"]], lists[c["b"]]
        assert c["diff"] == pytest.approx(a[c["metric"]].mean() - b[c["metric"]].mean())
        assert c["ci95"] == pytest.approx(list(paired_bootstrap(a["user_index"], a[c["metric"]], b[c["metric"]], seed=0)[1]))
    for arm, t, name in (("base_llm", 0, "prm"), ("dpo_round_1", 1, "prm"), ("dpo_round_2", 2, "prm")):
        recorded = json.loads((run / f"round_{t}" / "recommend" / name / "metrics.json").read_text())
        assert metrics["validation_map@5"][arm] == recorded["validation"]["map@5"]  # selection reads validation only
    assert json.loads((run / "round_0" / "reward" / "summary.json").read_text())["reward_lists"] == "train"
    drift = metrics["reward_drift"]  # every round's texts under round 0's reward model
    assert [r["round"] for r in drift] == [0, 1, 2] and drift[1]["users"] == drift[0]["users"]  # the same sampled train users
    assert drift[1]["sampled_minus_round_0"] == pytest.approx(drift[1]["sampled"] - drift[0]["sampled"])  # a mean of differences
    assert "sampled" not in drift[2]  # the last round feeds no DPO: its train users get the greedy text only
    alignment = metrics["alignment"]  # the held-out check, one entry per DPO round
    assert [a["round"] for a in alignment] == [0, 1]
    for a in alignment:
        assert a["pairs"] > 0 and a["optimizer_steps"] >= 1 and a["heldout_pairs"] >= 1
        pairs = pd.read_parquet(run / f"round_{a['round']}" / "heldout" / "pairs.parquet")  # recomputed by hand from each pair's margins
        for key, column in (("heldout_pair_accuracy", "margin"), ("heldout_reference_accuracy", "reference_margin"),
                            ("heldout_net_accuracy", "net_margin")):  # real texts carry their token counts: both guards
            correct = (pairs[column] > 0) + 0.5 * (pairs[column] == 0)
            assert a[key] == pytest.approx(correct.mean())
            assert a[f"{key}_ci95"] == pytest.approx(list(paired_bootstrap(pairs["user_index"], correct, 0 * correct, seed=0)[1]))
        validation = json.loads((run / f"round_{a['round'] + 1}" / "drift" / "summary.json").read_text())["validation"]
        assert a["validation_users"] == validation["users"] > 0  # the next round's drift stage, read as written
        assert a["validation_reward_drift"] == pytest.approx(validation["after"] - validation["before"])  # a mean of differences
        reward = json.loads((run / f"round_{a['round']}" / "reward" / "summary.json").read_text())["validation"]
        assert a["reward_reliability_ci95"] == reward["reliability"]["pair_agreement_ci95"]
        assert a["reward_probe_accuracy"] == reward["reward_probe"]["pair_accuracy"]
    report = (run / "report" / "report.md").read_text()
    said = [line.split("?")[0] for line in report.splitlines()[:15] if line.startswith("**Did ")]  # the first screen
    assert said == ["**Did knowledge help", "**Did DPO help", "**Did DPO learn the reward on users it never saw"]
    assert "config" in metrics and "timings" not in metrics  # times would make two identical runs' metrics differ
    assert json.loads((run / "timings.json").read_text())["round_0/generate"] > 0 and "round_0/generate" in report
    assert (run / "report" / "report.md").read_text().count("|") > 50
    assert (run / "report" / "differences.png").stat().st_size > 1000
    assert (run / "round_1" / "align" / "adapter_model.safetensors").is_file()


def _wait_for(predicate, process, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_killed_during_dpo_and_generation_then_resumed_gives_the_same_metrics(uninterrupted, tmp_path):
    _, expected = uninterrupted
    run = tmp_path / "killed"
    command = [sys.executable, "-m", "dpo4rec", "run", "--config", str(TINY), "--out", str(run)]
    kill_points = [
        lambda: any((run / "round_0").glob(".align.tmp-*")),  # DPO of round 0 under way
        lambda: (run / "round_1" / "generate" / "parts" / "part-00000.parquet").is_file(),  # mid-generation
    ]
    for point in kill_points:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
        reached = _wait_for(point, process)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert reached, "the run ended before the kill point"
    result = subprocess.run(command, capture_output=True, text=True, env=ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "report:" in result.stdout
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    assert metrics["arms"] == expected["arms"]
    assert metrics["comparisons"] == expected["comparisons"]
    # the same command gives the same report: rewards, pairs, held-out checks, round details, all of it
    assert (run / "report" / "metrics.json").read_bytes() == (uninterrupted[0] / "report" / "metrics.json").read_bytes()


@pytest.mark.slow
def test_single_stage_commands_reuse_the_run_and_another_config_is_refused(uninterrupted, tmp_path):
    run, metrics = uninterrupted
    # the per-round commands read the run's own config.json and reuse finished work
    reward = cli("reward", "--out", str(run), "--round", "1")
    assert reward.returncode == 0, reward.stderr[-2000:]
    assert "train lists" in reward.stdout and "reused" in reward.stdout
    align = cli("align", "--out", str(run), "--round", "1")
    assert align.returncode == 0 and "reused" in align.stdout and "round_0 adapters" in align.stdout
    assert cli("align", "--out", str(run), "--round", "3").returncode == 2  # round 2 was never aligned
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    refused = cli("run", "--config", str(TINY), "--out", str(run), "--set", "align.beta=0.5")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "another config" in refused.stderr and "align.beta" in refused.stderr
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before  # nothing touched
    # held-out rewards on a copy of round 0: trains the reward recommender without each user's last lists
    copy = tmp_path / "copy"
    for part in ("data", "prompts", "cache", "round_0/generate", "round_0/encode", "round_0/recommend/prm"):
        shutil.copytree(run / part, copy / part)
    held = tmp_path / "held.toml"
    held.write_text(TINY.read_text().replace('reward_lists = "train"', 'reward_lists = "held_out"\nreward_seeds = 2'))
    reward = cli("reward", "--config", str(held), "--out", str(copy), "--round", "0")
    assert reward.returncode == 0 and "held-out lists" in reward.stdout, reward.stderr[-2000:]
    # align.reward_seeds = 2: two held-out reward recommenders (seeds 0 and 1), the reward the mean of theirs
    members = [copy / "round_0" / "recommend" / name for name in ("prm-reward-holdout", "prm-reward-holdout-seed1")]
    assert all((m / "model.safetensors").is_file() for m in members)
    assert (members[0] / "model.safetensors").read_bytes() != (members[1] / "model.safetensors").read_bytes()
    from dpo4rec.reward.stage import reward_scorer
    from dpo4rec.config import load_config
    from dpo4rec.encode import read_embeddings

    config = load_config(held)
    rewards = pd.read_parquet(copy / "round_0" / "reward" / "rewards.parquet")
    emb = read_embeddings(copy / "round_0" / "encode")
    each = [reward_scorer(m, copy, config.align, "cpu")[0].score_embeddings(emb, "reward", rewards["user_index"].unique(), reward="loglik")
            for m in members]
    expected = (each[0]["reward"].to_numpy() + each[1]["reward"].to_numpy()) / 2
    assert not pd.Series(each[0]["reward"]).equals(pd.Series(each[1]["reward"]))
    merged = rewards.merge(each[0][["user_index", "sample"]].assign(expected=expected), on=["user_index", "sample"])
    assert len(merged) == len(rewards) and merged["reward"].to_numpy() == pytest.approx(merged["expected"].to_numpy(), rel=1e-6, nan_ok=True)
    assert json.loads((copy / "round_0" / "reward" / "summary.json").read_text())["reward_seeds"] == 2
    # align.reward_model = "text_match": no recommender is trained or read; a text's reward is the mean over its
    # user's held-out lists of the listwise reward of cosine(text, item) / temperature, recomputed here in numpy
    matched = tmp_path / "matched"
    for part in ("data", "prompts", "cache", "round_0/generate", "round_0/encode"):
        shutil.copytree(run / part, matched / part)
    text_match = tmp_path / "text_match.toml"
    text_match.write_text(TINY.read_text().replace('reward_lists = "train"', 'reward_lists = "held_out"\nreward_model = "text_match"')
                          .replace('reward = "loglik"', 'reward = "listwise"'))
    reward = cli("reward", "--config", str(text_match), "--out", str(matched), "--round", "0")
    assert reward.returncode == 0 and "held-out lists" in reward.stdout, reward.stderr[-2000:]
    assert not (matched / "round_0" / "recommend").exists()
    from dpo4rec.recommend.features import mark_reward_lists
    from dpo4rec.reward.scorers import TEXT_MATCH_TEMPERATURE

    rewards = pd.read_parquet(matched / "round_0" / "reward" / "rewards.parquet")
    emb = read_embeddings(matched / "round_0" / "encode")
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    item_vectors = dict(zip(emb.item_index, emb.item_vectors))
    held_out = mark_reward_lists(pd.read_parquet(matched / "data" / "lists.parquet"), 0.25)
    held_out = held_out[held_out["split"] == "reward"]
    checked = 0
    for row in rewards[rewards["sample"] > 0].head(6).itertuples():
        text = unit(emb.user_vectors[(emb.user_index == row.user_index) & (emb.sample == row.sample)][0])
        values = []
        for items, labels in held_out.loc[held_out["user_index"] == row.user_index, ["items", "labels"]].itertuples(index=False):
            labels = np.asarray(labels)
            if 0 < labels.sum() < len(labels):  # lists without a positive or without a negative are left out
                scores = np.array([unit(item_vectors[i]) @ text for i in items]) / TEXT_MATCH_TEMPERATURE
                log_softmax = scores - np.log(np.exp(scores - scores.max()).sum()) - scores.max()
                values.append(log_softmax[labels > 0].mean())
        if values:
            assert row.reward == pytest.approx(np.mean(values), rel=1e-4)
            checked += 1
    assert checked > 0
    # two runs of the same data compare pairwise, arm by arm: B is A with dpo_round_1 0.05 MAP@5 better on every list
    other = tmp_path / "other"
    shutil.copytree(run, other)
    tested = other / "round_1" / "recommend" / "prm" / "test_lists.parquet"
    frame = pd.read_parquet(tested)
    frame["map@5"] += 0.05
    frame.to_parquet(tested, index=False)
    compared = cli("compare", str(run), str(other), "--json", str(tmp_path / "cmp.json"))
    assert compared.returncode == 0, compared.stderr[-2000:]
    result = json.loads((tmp_path / "cmp.json").read_text())
    assert sorted(row["arm"] for row in result["arms"]) == sorted([*metrics["arms"], "selected"])
    for row in result["arms"]:
        expected = -0.05 if row["arm_a"] == "dpo_round_1" else 0.0
        assert row["map@5"]["diff"] == pytest.approx(expected, abs=1e-12)
        assert row["map@5"]["ci95"] == pytest.approx([expected, expected], abs=1e-12)
        assert row["ndcg@5"]["diff"] == 0


@pytest.mark.parametrize("setting", ["generate.n_samples=1", "align.beta=0", "run.rounds=0", "data.n_users=0",
                                     "align.reward_lists=sometimes", "align.no_such_key=1", "nonsense", "align.reward_seeds=0", "align.reward_seeds=2",
                                     'align.reward_model="text_match"', "align.reward_model=bm25",
                                     "align.reward=clicks", "align.pairing=random", "align.epochs=0", "align.learning_rate=0",
                                     "align.loss=kto", "align.sft_weight=-1", "align.lora_layers=-1",
                                     "generate.sampled_validation_users=0", "generate.sampled_train_users=-1",
                                     "recommend.train_text=bestest", "model.device=tpu", "encode.device=gpu",
                                     "data.protocol=next_item", "recommend.backbone=sasrec", "data.protocol=sequential",
                                     *([] if torch.cuda.is_available() else ["model.device=cuda"])])
def test_impossible_run_settings_are_one_line_and_write_nothing(setting, tmp_path, capsys):
    """In-process through the console script's entry function (the console script itself: tests/run/test_faults.py)."""
    assert main(["run", "--config", str(TINY), "--out", str(tmp_path / "run"), "--set", setting]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("dpo4rec: error: "), err
    assert not (tmp_path / "run").exists()
    if setting in NAMED_BY_THE_SET:  # a value the config itself refuses: the line names the --set, not the config file
        assert err.startswith(f"dpo4rec: error: --set {setting.split('=')[0]}="), err


NAMED_BY_THE_SET = ["align.beta=0", "run.rounds=0", "data.n_users=0", "align.reward_lists=sometimes", "align.reward_seeds=0",
                    "align.pairing=random", "align.lora_layers=-1", "data.protocol=next_item", "recommend.backbone=sasrec",
                    "data.protocol=sequential", "encode.device=gpu"]


def test_sampled_subset_larger_than_the_split_stops_after_the_data_stage(tmp_path):
    """Known only once the data stage has split the users: refused then, before any prompt, recommender or LLM."""
    result = cli("run", "--config", str(TINY), "--out", str(tmp_path / "run"), "--set", "generate.sampled_train_users=999")
    last = result.stderr.strip().splitlines()[-1]  # after the data stage's progress line
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert last.startswith("dpo4rec: error: generate.sampled_train_users = 999, but the run has only")
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if not p.name.startswith(".")) == ["config.json", "data", "timings.json"]
