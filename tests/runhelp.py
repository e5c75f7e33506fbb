"""What the run tests share: the tiny config, the subprocess environment, the console script."""

import os
import subprocess
import sys
from pathlib import Path

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def same_threads() -> None:
    """Subprocesses compute with as many threads as this process: bf16 products round differently with another
    thread count, sampled texts then differ, and so would everything downstream (other test modules set 1 thread)."""
    import torch

    ENV["OMP_NUM_THREADS"] = str(torch.get_num_threads())


def cli(*args) -> subprocess.CompletedProcess:
    """``dpo4rec ARGS`` as a user runs it (a new process), output captured."""
    return subprocess.run([sys.executable, "-m", "dpo4rec", *map(str, args)], capture_output=True, text=True, env=ENV)
