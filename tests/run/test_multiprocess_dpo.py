"""DPO as several processes (`accelerate launch`, gloo on CPUs): 2 processes of 2 pairs per pass train the same
adapter as 1 process of 4, the same effective batch."""

import json
import shutil
import subprocess
import sys

import pandas as pd
import pytest
from runhelp import ENV
from safetensors.torch import load_file

from dpo4rec.align.dpo import launch_align_stage
from dpo4rec.run_config import load_run_config

pytestmark = pytest.mark.slow


def align_folder(source, folder, batch_size: int, processes: int):
    """The tiny run's round-0 pairs (8 of them: two optimizer steps of 4) with its config, in fp32 (exact sums)."""
    folder.mkdir()
    for name in ("data", "prompts"):
        shutil.copytree(source / name, folder / name)
    shutil.copytree(source / "round_0" / "reward", folder / "round_0" / "reward")
    config = json.loads((source / "config.json").read_text())
    config["model"]["dtype"] = "fp32"
    config["align"].update(batch_size=batch_size, grad_accumulation=1, learning_rate=1e-3, processes=processes)
    (folder / "config.json").write_text(json.dumps(config))
    pairs = folder / "round_0" / "reward" / "pairs.parquet"
    pd.read_parquet(pairs).head(8).to_parquet(pairs, index=False)
    return folder


def test_two_processes_train_the_adapter_one_process_trains(uninterrupted, tmp_path, monkeypatch, capfd):
    source, _ = uninterrupted
    one, two = align_folder(source, tmp_path / "one", 4, 1), align_folder(source, tmp_path / "two", 2, 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    alone = subprocess.run([sys.executable, "-m", "dpo4rec", "align", "--out", str(one), "--round", "0"],
                           capture_output=True, text=True, env={**ENV, "OMP_NUM_THREADS": "1"})
    assert alone.returncode == 0, alone.stderr[-3000:]
    config = load_run_config(two)  # what `dpo4rec run` does with align.processes = 2
    launch_align_stage(two, 0, config.model, config.align)
    assert capfd.readouterr().out.count("wrote ") == 1  # rank 0 alone writes and reports
    logs = [json.loads((run / "round_0" / "align" / "training_log.json").read_text()) for run in (one, two)]
    assert [len(log["steps"]) for log in logs] == [2, 2]  # 8 pairs, 4 per optimizer step in both
    assert logs[0]["steps"][-1]["loss"] == pytest.approx(logs[1]["steps"][-1]["loss"], abs=1e-4)
    a, b = (load_file(run / "round_0" / "align" / "adapter_model.safetensors") for run in (one, two))
    update = sum(float(a[k].norm() ** 2) for k in a if "lora_B" in k) ** 0.5  # B starts at zero: B is the update
    assert update > 0
    for key in a:
        assert float((a[key] - b[key]).norm()) <= 1e-2 * update, key
    assert not (two / "round_0" / ".dpo-dataset").exists()  # the pairs shared by the processes are cleaned up
