import json
import subprocess
import sys

import numpy as np
import pandas as pd

from dpo4rec.cli import main
from dpo4rec.config import DataConfig
from dpo4rec.data.stage import read_protocol, run_data_stage


def test_stage_writes_reuses_and_refuses_other_configs(tmp_path, capsys):
    config = DataConfig(dataset="ml-100k", n_users=100, seed=1)
    first = run_data_stage(tmp_path, config)
    assert not first.reused
    files = {p.name for p in first.folder.iterdir()}
    assert files == {"users.parquet", "items.parquet", "interactions.parquet", "lists.parquet", "summary.json", "manifest.json"}
    manifest = json.loads((first.folder / "manifest.json").read_text())
    assert manifest["config"]["n_users"] == 100 and manifest["inputs"]
    before = {p.name: p.stat().st_mtime_ns for p in first.folder.iterdir()}

    again = run_data_stage(tmp_path, config)
    assert again.reused and again.summary == first.summary
    # another config: refused with one line, nothing overwritten
    code = main(["data", "--dataset", "ml-100k", "--users", "50", "--out", str(tmp_path)])
    assert code == 2
    assert "another run" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in first.folder.iterdir()} == before
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())

    protocol = read_protocol(first.folder)
    assert len(protocol.users) == 100
    items = np.stack(protocol.lists["items"].to_numpy())
    assert items.min() >= 1 and items.max() <= protocol.items["item_index"].max()
    prompt = protocol.interactions[protocol.interactions["in_prompt"]]
    assert (prompt.groupby("user_index").size() == protocol.users.set_index("user_index")["n_prompt"]).all()


def test_ml1m_stage_through_the_console_script(tmp_path):
    # the real command on the full data set, with the paper's prompt history (30 items)
    result = subprocess.run(
        [sys.executable, "-m", "dpo4rec", "data", "--dataset", "ml-1m", "--users", "all", "--set", "data.prompt_history_max=none", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "6,040" in result.stdout and "208,579" in result.stdout
    lists = pd.read_parquet(tmp_path / "data" / "lists.parquet")
    assert len(lists) == 208_579


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    cases = [
        ["data", "--dataset", "no-such-set", "--out", str(tmp_path)],
        ["data", "--dataset", str(tmp_path / "missing") + "/", "--out", str(tmp_path)],
        ["data", "--config", str(tmp_path / "none.toml"), "--out", str(tmp_path)],
    ]
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[data]\nn_userz = 5\n")
    cases.append(["data", "--config", str(bad_toml), "--out", str(tmp_path)])
    range_toml = tmp_path / "range.toml"
    range_toml.write_text("[data]\nn_users = -1\n")
    cases.append(["data", "--config", str(range_toml), "--out", str(tmp_path)])
    for argv in cases:
        result = subprocess.run([sys.executable, "-m", "dpo4rec", *argv], capture_output=True, text=True)
        assert result.returncode == 2, (argv, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "data").exists()
