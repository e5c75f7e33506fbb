#!/usr/bin/env bash
# The device check a session can afford (under 8 minutes on one lent H100/H200): on a bare GPU machine, with
# .gpu-carry/ built here by benchmarks/gpu_prepare.sh and carried along, it installs the carried wheels, builds
# random-init SmolLM2-135M and MiniLM weights, runs the tiny pipeline on CUDA with each backend available, and the
# sampling benchmark on CUDA (ours and model.generate at the same batch). One line per result, also in $OUT/results.txt.
#   bash benchmarks/gpu_check.sh            (OUT defaults to /tmp/gpu-check; the device tool sets $OUT)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
DEVICE=${DEVICE:-cuda}   # DEVICE=cpu PROMPTS=4 tries the script on a CPU machine
PROMPTS=${PROMPTS:-256}
mkdir -p "$OUT"
RESULTS="$OUT/results.txt"
say() { echo "gpu_check: $*" | tee -a "$RESULTS"; }
python -m pip install --quiet --no-deps --target "$OUT/site" .gpu-carry/wheels/*.whl || say "pip install failed"
export PYTHONPATH="$PWD/src:$PWD/benchmarks:$OUT/site:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 DPO4REC_CACHE="$OUT/cache"
say "$(python -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")' 2>&1 | tail -1)"
python benchmarks/gpu_weights.py .gpu-carry "$OUT/models" >> "$OUT/weights.log" 2>&1 || say "weights failed: $(tail -1 "$OUT/weights.log")"
MODEL="\"$OUT/models/llm\""
ENCODER="\"$OUT/models/encoder\""
backends="auto hf"
python -c "import vllm" 2>/dev/null && backends="$backends vllm"
for backend in $backends; do
    start=$(date +%s)
    timeout 150 python -m dpo4rec run --config configs/tiny.toml --out "$OUT/tiny-$backend" --set model.device="\"$DEVICE\"" \
        --set model.name="$MODEL" --set encode.encoder="$ENCODER" --set generate.backend="\"$backend\"" \
        > "$OUT/tiny-$backend.log" 2>&1
    rc=$?
    say "tiny pipeline on $DEVICE, generate.backend=$backend: exit $rc in $(( $(date +%s) - start )) s; $(grep -v '^\s*$' "$OUT/tiny-$backend.log" | tail -1 | cut -c1-200)"
done
start=$(date +%s)
timeout 240 python benchmarks/sampling.py --device "$DEVICE" --model "$OUT/models/llm" --prompts "$PROMPTS" --batch-rows 2816 \
    --hf-batch-rows 2816 --skip naive llama_cpp --json "$OUT/sampling.json" > "$OUT/sampling.log" 2>&1
rc=$?
say "sampling benchmark on $DEVICE: exit $rc in $(( $(date +%s) - start )) s"
grep -E "^(batched|ours) |limit here" "$OUT/sampling.log" | while read -r row; do say "  $row"; done
