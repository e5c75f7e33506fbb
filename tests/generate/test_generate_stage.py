import os
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from dpo4rec.config import GenerateConfig, ModelConfig
from dpo4rec.errors import InputError
from dpo4rec.generate.stage import run_generate_stage

# small enough for CI: 8 users, 4 batches, 8 new tokens
GEN = GenerateConfig(n_samples=3, max_new_tokens=8, batch_rows=8, max_prefill_tokens=400)


def _copy_run(tiny_run, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(tiny_run, target)
    return target


def test_greedy_for_everyone_samples_for_train_and_validation_users(tiny_run, tmp_path):
    run = _copy_run(tiny_run, tmp_path)
    result = run_generate_stage(run, 0, ModelConfig(), GEN)
    frame = pd.read_parquet(result.folder / "knowledge.parquet")
    users = pd.read_parquet(run / "data" / "users.parquet").set_index("user_index")
    per_user = frame.groupby("user_index")["sample"].apply(sorted)
    for user, samples in per_user.items():
        expected = [0, 1, 2, 3] if users.loc[user, "split"] in ("train", "validation") else [0]
        assert samples == expected
    assert set(frame["finish_reason"]) <= {"stop", "length"}
    assert (frame["n_tokens"] <= 8).all()
    assert frame["empty"].equals(frame["text"].str.strip() == "")
    assert result.summary["users"] == 8
    again = run_generate_stage(run, 0, ModelConfig(), GEN)
    assert again.reused
    with pytest.raises(InputError, match="another run"):
        run_generate_stage(run, 0, ModelConfig(), GenerateConfig(n_samples=2, max_new_tokens=8, batch_rows=8))


def test_sampled_subsets_of_train_users(tiny_run, tmp_path):
    from dataclasses import replace

    from dpo4rec.generate.stage import sampled_users

    users = pd.read_parquet(tiny_run / "data" / "users.parquet")
    train = set(users.loc[users["split"] == "train", "user_index"])
    validation = set(users.loc[users["split"] == "validation", "user_index"])
    some = sampled_users(users, replace(GEN, sampled_train_users=2, sampled_validation_users=0))
    assert len(some) == 2 and set(some) <= train
    assert list(some) == list(sampled_users(users, replace(GEN, sampled_train_users=2, sampled_validation_users=0)))  # seeded
    assert set(sampled_users(users, GEN)) == train | validation
    with pytest.raises(InputError, match=f"generate.sampled_train_users = 99, but the run has only {len(train)} train users"):
        sampled_users(users, replace(GEN, sampled_train_users=99))


def test_resume_after_a_stop_gives_the_same_texts(tiny_run, tmp_path):
    whole = run_generate_stage(_copy_run(tiny_run, tmp_path / "a"), 0, ModelConfig(), GEN)
    run = _copy_run(tiny_run, tmp_path / "b")
    partial = run_generate_stage(run, 0, ModelConfig(), GEN, stop_after_batches=1)
    assert not (partial.folder / "knowledge.parquet").exists()
    assert len(list((partial.folder / "parts").glob("part-*.parquet"))) == 1
    resumed = run_generate_stage(run, 0, ModelConfig(), GEN)
    pd.testing.assert_frame_equal(
        pd.read_parquet(whole.folder / "knowledge.parquet"), pd.read_parquet(resumed.folder / "knowledge.parquet")
    )


@pytest.mark.slow
def test_kill_9_then_rerun_loses_nothing_and_duplicates_nothing(tiny_run, tmp_path):
    reference = run_generate_stage(_copy_run(tiny_run, tmp_path / "ref"), 0, ModelConfig(), GEN)
    run = _copy_run(tiny_run, tmp_path / "killed")
    args = [sys.executable, "-m", "dpo4rec", "generate", "--out", str(run), "--dataset", "ml-100k", "--users", "8",
            "--n", "3", "--max-new-tokens", "8"]
    config = tmp_path / "gen.toml"
    config.write_text("[generate]\nbatch_rows = 8\nmax_prefill_tokens = 400\n[prompts]\nmax_prompt_tokens = 160\n[data]\nseed = 0\n")
    args += ["--config", str(config)]
    # the same thread count as the reference run in this process: bf16 products round differently with another
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    parts = run / "round_0" / "generate" / "parts"
    deadline = time.time() + 240
    while time.time() < deadline and not list(parts.glob("part-*.parquet")):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = len(list(parts.glob("part-*.parquet")))
    assert 1 <= done_before < 4, "the kill should land mid-run"
    result = subprocess.run(args, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    resumed = pd.read_parquet(run / "round_0" / "generate" / "knowledge.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(reference.folder / "knowledge.parquet"), resumed)
    assert not resumed.duplicated(["user_index", "sample"]).any()


def test_two_processes_write_the_texts_of_one(tiny_run, tmp_path):
    """generate.processes = 2: each spawned process takes every other batch and writes its own part files; the
    merged texts equal one process's (seeds are per batch). Both sides compute with one thread: bf16 products
    round differently with another thread count."""
    from dataclasses import replace

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = run_generate_stage(_copy_run(tiny_run, tmp_path / "one"), 0, ModelConfig(), GEN)
        two = run_generate_stage(_copy_run(tiny_run, tmp_path / "two"), 0, ModelConfig(), replace(GEN, processes=2))
    finally:
        torch.set_num_threads(threads)
    pd.testing.assert_frame_equal(pd.read_parquet(one.folder / "knowledge.parquet"), pd.read_parquet(two.folder / "knowledge.parquet"))
    assert not (two.folder / "parts").exists()
    assert run_generate_stage(two.folder.parents[1], 0, ModelConfig(), GEN).reused  # the number of processes is not in the manifest
    with pytest.raises(InputError, match="generate.processes must be >= 1, got 0"):
        replace(GEN, processes=0)


def test_a_run_continues_with_another_number_of_generating_processes(tmp_path):
    from dataclasses import replace

    from dpo4rec.config import PipelineConfig
    from dpo4rec.run_config import record_config

    config = PipelineConfig()
    record_config(tmp_path, config)
    record_config(tmp_path, replace(config, generate=replace(config.generate, processes=4)))  # accepted
    with pytest.raises(InputError, match="another config .*generate.n_samples"):
        record_config(tmp_path, replace(config, generate=replace(config.generate, n_samples=3)))


def test_item_knowledge_resumes_batch_by_batch(tmp_path):
    from dataclasses import replace

    from dpo4rec.generate.stage import generate_item_knowledge

    items = pd.DataFrame({"item_index": [5, 3, 9, 1, 7, 2],
                          "text": [f"Describe the movie number {i} in one sentence." for i in (5, 3, 9, 1, 7, 2)]})
    gen = replace(GEN, batch_rows=4, max_new_tokens=4)  # greedy only: 4 items a batch, 2 batches
    whole = generate_item_knowledge(items, ModelConfig(), gen, tmp_path / "whole")
    assert list(whole["item_index"]) == [1, 2, 3, 5, 7, 9] and (whole["n_tokens"] <= 4).all()
    parts = tmp_path / "resumed"
    first = generate_item_knowledge(items, ModelConfig(), gen, parts, stop_after_batches=1)
    written = sorted(parts.glob("part-*.parquet"))
    assert len(written) == 1 and 0 < len(first) < len(items)  # a crash after one batch keeps that batch
    stamp = written[0].stat().st_mtime_ns
    resumed = generate_item_knowledge(items, ModelConfig(), gen, parts)
    pd.testing.assert_frame_equal(resumed, whole)
    assert written[0].stat().st_mtime_ns == stamp  # not generated again
