"""One finished tiny run (configs/tiny.toml) shared by the run tests; they copy it before changing anything."""

import json

import pytest
from runhelp import TINY, same_threads

from dpo4rec.config import load_config
from dpo4rec.run import run_pipeline


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory):
    """(run folder, its report's metrics): read it, never write into it."""
    same_threads()
    run = tmp_path_factory.mktemp("tiny")
    report = run_pipeline(load_config(TINY), run)
    return run, json.loads((report / "metrics.json").read_text())
