"""Fault injection through the real console script: concurrent runs, damaged files, OS errors, mismatched compares.

Every case must end in a complete, correct run or in one line on stderr with
exit code 2 and nothing lost. Cases work on copies of the shared tiny run.
"""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
from runhelp import ENV, TINY, cli

pytestmark = pytest.mark.slow


def one_line_error(result: subprocess.CompletedProcess, *words: str) -> str:
    """The failure is exit 2 and one line on stderr (warnings from libraries aside) that names what is wrong."""
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("dpo4rec: error:")]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def snapshot(folder) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture
def copy(uninterrupted, tmp_path):
    run, metrics = uninterrupted
    target = tmp_path / "copy"
    shutil.copytree(run, target)
    return target, metrics


def test_a_second_process_on_a_run_folder_is_refused_and_a_dead_holder_is_taken_over(tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "dpo4rec", "run", "--config", str(TINY), "--out", str(run)]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        deadline = time.time() + 300
        while not (run / "data" / "manifest.json").is_file() and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended before the second started"
        second = cli("run", "--config", TINY, "--out", run)
        one_line_error(second, str(run), f"pid {first.pid}", "in use")
        assert first.poll() is None  # the holder goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the kernel dropped the killed holder's lock: the next command takes the folder over
    third = cli("data", "--config", TINY, "--out", run)
    assert third.returncode == 0, third.stderr[-2000:]
    assert "reused" in third.stdout
    assert not (run / ".lock").exists()


@pytest.mark.parametrize("damaged", ["data/lists.parquet", "round_0/generate/knowledge.parquet",
                                     "round_1/align/adapter_config.json", "round_0/encode/users.safetensors"])
def test_a_damaged_output_is_rebuilt_and_the_run_gives_the_same_report(copy, damaged):
    run, metrics = copy
    path = run / damaged
    if path.suffix == ".json":
        path.unlink()  # an adapter folder without its config
    else:
        truncate(path)
    result = cli("run", "--config", TINY, "--out", run)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{path.parent}: {path.name}" in result.stderr and "rebuilding" in result.stderr
    assert json.loads((run / "report" / "metrics.json").read_text())["arms"] == metrics["arms"]
    assert (run / damaged).is_file()


def test_a_damaged_embedding_cache_shard_is_dropped_and_encoded_again(copy):
    run, metrics = copy
    for shard in (run / "cache").rglob("shard-*.safetensors"):
        truncate(shard)
    shutil.rmtree(run / "round_2" / "encode")  # so that encoding has to read the cache
    result = cli("run", "--config", TINY, "--out", run)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "damaged embedding cache shard" in result.stderr
    assert json.loads((run / "report" / "metrics.json").read_text())["arms"] == metrics["arms"]


@pytest.mark.parametrize("damaged, command, redo", [
    ("round_2/recommend/prm/test_lists.parquet", "report", None),
    ("round_2/generate/knowledge.parquet", "report", None),  # read last, after the old code had rewritten half the report
    ("round_0/recommend/prm/metrics.json", "report", None),
    ("round_1/recommend/prm/model.safetensors", "reward", "round_1/reward"),
    ("round_1/reward/pairs.parquet", "align", "round_1/align"),
])
def test_a_single_stage_command_names_the_damaged_file_and_keeps_what_was_written(copy, damaged, command, redo):
    run, _ = copy
    truncate(run / damaged)
    if redo:  # the stage's own output is gone, so it has to read the damaged input
        shutil.rmtree(run / redo)
    before = snapshot(run)
    result = cli(command, "--out", run, *(["--round", "1"] if redo else []))
    one_line_error(result, str(run / damaged), "damaged or unreadable")
    assert snapshot(run) == before  # the old report, every other file: untouched
    assert not list(run.glob(".report.*")) and not list(run.glob("*/.*.tmp-*"))


@pytest.mark.parametrize("case", ["out_in_proc", "out_is_a_file", "config_is_a_folder", "config_not_utf8",
                                  "section_not_a_table", "report_on_an_empty_folder", "report_on_no_folder"])
def test_os_and_config_errors_are_one_line_and_leave_nothing_behind(case, tmp_path):
    out = tmp_path / "run"
    config = TINY
    if case == "out_in_proc":
        out = "/proc/dpo4rec-cannot-be-here"
    elif case == "out_is_a_file":
        out.write_text("a file the user keeps")
    elif case == "config_is_a_folder":
        config = tmp_path
    elif case == "config_not_utf8":
        config = tmp_path / "latin1.toml"
        config.write_bytes('[data]\ndataset = "caf\xe9"\n'.encode("latin-1"))
    elif case == "section_not_a_table":
        config = tmp_path / "five.toml"
        config.write_text("data = 5\n")
    elif case == "report_on_an_empty_folder":
        out.mkdir()
    if case.startswith("report"):
        result = cli("report", "--out", out)
    else:
        result = cli("run", "--config", config, "--out", out)
    line = one_line_error(result)
    if case == "out_is_a_file":
        assert out.read_text() == "a file the user keeps" and str(out) in line
    elif case == "report_on_an_empty_folder":
        assert list(out.iterdir()) == []  # no report/, no lock file
    elif case in ("config_is_a_folder", "config_not_utf8", "section_not_a_table"):
        assert str(config) in line and not out.exists()
    elif case == "report_on_no_folder":
        assert not out.exists()


def test_compare_refuses_runs_made_from_different_data(copy, tmp_path):
    run, _ = copy
    other = tmp_path / "other"
    shutil.copytree(run, other)
    made = cli("data", "--config", TINY, "--seed", "1", "--out", tmp_path / "seed1")
    assert made.returncode == 0, made.stderr[-2000:]
    for name in ("users.parquet", "lists.parquet"):  # a run whose data are another draw of the same shape
        shutil.copy(tmp_path / "seed1" / "data" / name, other / "data" / name)
    result = cli("compare", run, other, "--json", tmp_path / "cmp.json")
    one_line_error(result, "different data", "lists.parquet" if "lists" in result.stderr else "users.parquet")
    assert not (tmp_path / "cmp.json").exists()
