#!/usr/bin/env bash
# The device check a session can afford (under 8 minutes on one lent H100/H200): on a bare GPU machine, with
# .gpu-carry/ built here by benchmarks/gpu_prepare.sh and carried along, it installs the carried wheels, builds
# random-init SmolLM2-135M and MiniLM weights, runs the tiny pipeline on CUDA with the default backend, the sampling
# benchmark on CUDA (ours and model.generate at the same batch), a slice of the paper's ML-1M run (its per-stage
# times project the whole), the tiny pipeline with the other backends, and ours at a larger batch, each step bounded
# by what is left of DEADLINE seconds, then DPO's speed on CUDA (benchmarks/dpo.py: TRL's two rows against ours with
# either attention layout, 16 pairs a step). One line per result, also in $OUT/results.txt; logs and JSON in
# $OUT/gpu-check.tar.gz (one file: the device tool brings back only a few files from $OUT).
#   bash benchmarks/gpu_check.sh            (OUT defaults to /tmp/gpu-check; the device tool sets $OUT)
#   DEVICE=cpu PROMPTS=4 SLICE_USERS=30 bash benchmarks/gpu_check.sh      (tries the script on a CPU machine)
#   STEPS="sampling sampling-large" bash benchmarks/gpu_check.sh          (only those steps: tiny-auto, sampling,
#                                                                          paper-slice-N, tiny-hf, sampling-large, dpo)
set -uo pipefail
cd "$(dirname "$0")/.."
FINAL=${OUT:-/tmp/gpu-check}
WORK=${WORK:-/tmp/gpu-work}   # wheels, weights and runs: large, so outside $FINAL (which travels back)
OUT=$WORK/out                 # logs and JSON, packed into $FINAL at the end
DEVICE=${DEVICE:-cuda}
PROMPTS=${PROMPTS:-256}
SLICE_USERS=${SLICE_USERS:-600}
DEADLINE=${DEADLINE:-420}
mkdir -p "$FINAL" "$OUT"
RESULTS="$FINAL/results.txt"
say() { echo "gpu_check: $*" | tee -a "$RESULTS"; }
left() { local s=$(( DEADLINE - SECONDS )); (( s < $1 )) && echo "$s" || echo "$1"; }   # min(wanted, time left)
out_of_time() { (( $(left 20) < 20 )) && say "$1: skipped, under 20 s left of DEADLINE=$DEADLINE"; }
python -m pip install --quiet --no-deps --target "$WORK/site" .gpu-carry/wheels/*.whl > "$OUT/pip.log" 2>&1 || say "pip install failed: $(tail -1 "$OUT/pip.log")"
export PYTHONPATH="$PWD/src:$PWD/benchmarks:$WORK/site:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 DPO4REC_CACHE="$WORK/cache"
say "$(python -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")' 2>&1 | tail -1)"
say "modules: $(python - <<'PY' 2>&1 | tail -1
import importlib
names = ["transformers", "peft", "trl", "accelerate", "datasets", "sentence_transformers", "pandas", "pyarrow", "matplotlib", "tqdm"]
found = []
for name in names:
    try:
        found.append(f"{name} {getattr(importlib.import_module(name), '__version__', '?')}")
    except Exception as exc:
        found.append(f"{name} MISSING ({type(exc).__name__}: {exc})")
print(", ".join(found))
PY
)"
python benchmarks/gpu_weights.py .gpu-carry "$WORK/models" > "$OUT/weights.log" 2>&1 || say "weights failed: $(tail -1 "$OUT/weights.log")"
SETS=(--set model.device="\"$DEVICE\"" --set model.name="\"$WORK/models/llm\"" --set encode.encoder="\"$WORK/models/encoder\"")

chosen() { [[ " ${STEPS:-all} " == *" all "* || " ${STEPS:-} " == *" $1 "* ]]; }   # STEPS="sampling paper-slice-600" runs those alone

pipeline() {  # name, seconds wanted, dpo4rec run arguments...
    local name=$1 wanted=$2; shift 2
    chosen "$name" || return 0
    out_of_time "$name" && return
    local start=$SECONDS
    timeout "$(left "$wanted")" python -m dpo4rec run --out "$WORK/$name" "${SETS[@]}" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    cp "$WORK/$name/timings.json" "$OUT/$name-timings.json" 2>/dev/null
    cp "$WORK/$name/report/metrics.json" "$OUT/$name-metrics.json" 2>/dev/null
    say "$name on $DEVICE: exit $rc in $(( SECONDS - start )) s; $(grep -v '^\s*$' "$OUT/$name.log" | tail -1 | cut -c1-200)"
}

sampling() {  # name, seconds wanted, prompts, benchmarks/sampling.py arguments...
    local name=$1 wanted=$2 prompts=$3; shift 3
    chosen "$name" || return 0
    out_of_time "$name" && return
    local start=$SECONDS rows=$(( prompts * 11 ))
    timeout "$(left "$wanted")" python benchmarks/sampling.py --device "$DEVICE" --model "$WORK/models/llm" --prompts "$prompts" \
        --batch-rows "$rows" --hf-batch-rows "$rows" --skip naive llama_cpp "$@" --json "$OUT/$name.json" > "$OUT/$name.log" 2>&1
    say "$name ($prompts prompts x 11 rows per batch) on $DEVICE: exit $? in $(( SECONDS - start )) s"
    grep -E "^(batched|ours) |limit here" "$OUT/$name.log" | while read -r row; do say "  $row"; done
}

pipeline tiny-auto 150 --config configs/tiny.toml
sampling sampling 150 "$PROMPTS"
# The paper's ML-1M setting on a slice of users, one DPO round; 16 pairs per optimizer step as 16 x 1 (the paper's
# 2 x 8 is the same step, split for an 8B model's memory)
pipeline "paper-slice-$SLICE_USERS" 240 --config configs/paper-ml1m.toml --set data.n_users="$SLICE_USERS" --set run.rounds=1 \
    --set align.batch_size=16 --set align.grad_accumulation=1
backends="hf"
python -c "import vllm" 2>/dev/null && backends="$backends vllm"
for backend in $backends; do
    pipeline "tiny-$backend" 120 --config configs/tiny.toml --set generate.backend="\"$backend\""
done
sampling sampling-large 60 $(( PROMPTS * 4 )) --skip naive llama_cpp batched
if chosen dpo && ! out_of_time dpo; then
    start=$SECONDS
    timeout "$(left 120)" python benchmarks/dpo.py --device "$DEVICE" --model "$WORK/models/llm" --n 32 --batch-size 16 \
        --accumulation 1 --skip trl ours --json "$OUT/dpo.json" > "$OUT/dpo.log" 2>&1
    say "dpo (32 pairs, 16 a step) on $DEVICE: exit $? in $(( SECONDS - start )) s"
    grep -E "^\| (compact|ours)" "$OUT/dpo.log" | while read -r row; do say "  $row"; done
fi
say "done in $SECONDS s"
tar czf "$FINAL/gpu-check.tar.gz" -C "$OUT" .
