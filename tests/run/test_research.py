"""Each script in research/ runs on the shared tiny run and prints its numbers (a smoke run: the numbers are the
scripts' own; the functions they call are tested where they live)."""

import subprocess
import sys
from pathlib import Path

from runhelp import ENV

RESEARCH = Path(__file__).resolve().parents[2] / "research"


def test_drift_length_splits_the_checks_by_length(uninterrupted):
    run, _ = uninterrupted
    result = subprocess.run([sys.executable, str(RESEARCH / "drift_length.py"), str(run), "--round", "0"],
                            capture_output=True, text=True, env=ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "validation drift, all sampled texts:" in result.stdout and "held-out pair accuracy, all pairs:" in result.stdout
    missing = subprocess.run([sys.executable, str(RESEARCH / "drift_length.py"), str(run / "nothing")],
                             capture_output=True, text=True, env=ENV)
    assert missing.returncode == 2 and "config.json not found" in missing.stderr


def test_every_research_script_is_indexed_and_smoke_run():
    scripts = sorted(p.name for p in RESEARCH.glob("*.py"))
    index = (RESEARCH / "README.md").read_text()
    tests = Path(__file__).read_text()
    assert scripts and all(f"`{name}`" in index and name in tests for name in scripts)
