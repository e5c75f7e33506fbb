"""Does training the same recommender twice on the same files give the same weights?

    python experiments/recommender_determinism.py RUN [--repeats 3] [--default-kernels]

Copies RUN's data and round-0 embeddings into temporary run folders, trains
the knowledge recommender of RUN's config in each (in this one process), and
prints the largest weight difference to the first. ``--default-kernels``
trains without the deterministic kernels that the recommend stage uses now
(what it did before), to show the difference they make.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from unittest import mock

from dpo4rec.artifacts import read_safetensors
from dpo4rec.recommend import run_recommend_stage
from dpo4rec.recommend import train as train_module
from dpo4rec.run import load_run_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--default-kernels", action="store_true")
    args = parser.parse_args(argv)
    config = replace(load_run_config(args.run).recommend, knowledge=True)
    weights = []
    with tempfile.TemporaryDirectory() as scratch:
        for i in range(args.repeats):
            run = Path(scratch) / f"run{i}"
            for part in ("data", "round_0/embeddings"):
                shutil.copytree(args.run / part, run / part)
            kernels = mock.patch.object(train_module, "deterministic_kernels", contextlib.nullcontext) if args.default_kernels \
                else contextlib.nullcontext()
            with kernels:
                result = run_recommend_stage(config, run, 0, progress=False)
            weights.append(read_safetensors(result.folder / "model.safetensors"))
    kernels = "PyTorch's default kernels" if args.default_kernels else "deterministic kernels (the recommend stage)"
    print(f"{args.repeats} trainings of the {config.backbone} recommender on {args.run}'s files, {kernels}:")
    for i, state in enumerate(weights[1:], start=1):
        diff = max(float((state[k].float() - weights[0][k].float()).abs().max()) for k in state)
        print(f"  training {i + 1} vs 1: largest weight difference {diff:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
