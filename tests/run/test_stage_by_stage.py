"""The README's stage-by-stage block, run as written (tiny sizes through --set), and the config each command runs with."""

import json
import shlex
import shutil
from pathlib import Path

import pandas as pd
import pytest

from dpo4rec.cli import main

README = Path(__file__).resolve().parents[2] / "README.md"
# ML-100k at a tiny size: 40 users -> 28 train / 8 validation / 4 test (the default split 70/20/10)
TINY_SETS = ["--dataset", "ml-100k", "--users", "40", "--set", "prompts.max_prompt_tokens=256",
             "--set", "generate.max_new_tokens=24", "--set", "generate.sampled_train_users=24",
             "--set", "generate.sampled_validation_users=8", "--set", "recommend.max_epochs=2",
             "--set", "align.grad_accumulation=1", "--set", "align.max_length=320"]


def readme_stage_commands() -> list[list[str]]:
    block = README.read_text().split("<!-- stage-by-stage -->", 1)[1].split("```", 2)[1]
    return [shlex.split(line.split("#", 1)[0]) for line in block.splitlines() if line.strip().startswith("dpo4rec ")]


@pytest.mark.slow
def test_the_readme_stage_by_stage_commands_reach_a_report(tmp_path, capsys):
    commands = readme_stage_commands()
    assert [c[1] for c in commands[:3]] == ["data", "prompts", "generate"] and commands[-1][1] == "report"
    for i, command in enumerate(commands):
        args = [a.replace("runs/x", str(tmp_path / "x")) for a in command[1:]] + (TINY_SETS if i == 0 else [])
        assert main(args) == 0, (command, capsys.readouterr().err[-2000:])
    run = tmp_path / "x"
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["n_users"] == 40 and config["generate"]["sampled_train_users"] == 24  # the first command's, kept
    assert config["generate"]["n_samples"] == 4 and config["align"]["reward_model"] == "text_match"  # the default config's
    knowledge = pd.read_parquet(run / "round_0" / "generate" / "knowledge.parquet")
    assert knowledge.groupby("user_index").size().max() == 1 + 4  # greedy + N = 4 of the recorded config
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    assert set(metrics["arms"]) == {"no_knowledge", "base_llm", "dpo_round_1"}
    assert [a["round"] for a in metrics["alignment"]] == [0]  # align ran the held-out check
    assert metrics["alignment"][0]["heldout_pair_accuracy"] is not None and metrics["alignment"][0]["validation_users"] == 8
    assert [r["round"] for r in metrics["reward_drift"]] == [0, 1]  # the drift stage's rows, read by the report
    assert main(["prompts", "--out", str(run), "--users", "50"]) == 2  # a conflicting option is refused
    assert "--users 50" in capsys.readouterr().err


def test_recommend_on_a_finished_run_trains_with_that_runs_settings(uninterrupted, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(uninterrupted[0], run)
    assert main(["recommend", "--out", str(run), "--backbone", "dlcm"]) == 0
    manifest = json.loads((run / "round_0" / "recommend" / "dlcm" / "manifest.json").read_text())
    assert manifest["config"]["max_epochs"] == 3 and manifest["config"]["backbone"] == "dlcm"  # tiny.toml's epochs, not the default's 8
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["recommend"]["backbone"] == "prm"  # a variant in its own folder; the run's record is unchanged


def test_a_failed_first_command_leaves_nothing_and_the_corrected_one_runs(tmp_path, capsys):
    run = tmp_path / "x"
    assert main(["run", "--out", str(run), "--set", 'data.dataset="ml-2m"']) == 2
    assert "ml-2m" in capsys.readouterr().err and not run.exists()
    assert main(["data", "--out", str(run), "--dataset", "ml-100k", "--users", "30"]) == 0
    assert json.loads((run / "config.json").read_text())["data"]["dataset"] == "ml-100k"


@pytest.mark.parametrize("option, words", [
    (["--set", "align.betta=1"], ["--set align.betta=1", "did you mean beta?"]),
    (["--set", "align.beta=abc"], ["--set align.beta", "must be a number"]),
    (["--set", "align.beta=-1"], ["--set align.beta=-1", "align.beta must be > 0"]),
    (["--set", "aling.beta=1"], ["--set aling.beta=1", "did you mean align?"]),
])
def test_a_bad_set_names_itself_and_the_closest_key(tmp_path, capsys, option, words):
    assert main(["run", "--out", str(tmp_path / "x"), *option]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(w in err for w in words), err
    assert "default.toml" not in err and not (tmp_path / "x").exists()
