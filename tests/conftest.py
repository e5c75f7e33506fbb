import os
from pathlib import Path

import pytest

from tiny_models import tiny_causal_lm

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
BEAUTY = SHARED / "data" / "amazon-beauty"


@pytest.fixture(scope="session")
def beauty_dir() -> Path:
    if not (BEAUTY / "sequences.txt").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"Amazon-Beauty not found at {BEAUTY}; CI must have ../shared beside the clone")
        pytest.skip(f"Amazon-Beauty not found at {BEAUTY}")
    return BEAUTY


@pytest.fixture(scope="session")
def ml1m():
    from dpo4rec.data import load_dataset

    return load_dataset("ml-1m")


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_lm(request):
    """A random-init tiny Llama and a tiny Qwen2 (``tiny_causal_lm``), each test run on both."""
    return tiny_causal_lm(request.param)
