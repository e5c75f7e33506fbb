#!/bin/bash
# Rewards on held-out lists (A, the default) vs. on train lists (B), on the same
# users; B reuses A's round 0 (same texts, same evaluated recommender), so only
# the preference pairs differ. docs/results.md has the outcome.
#   experiments/compare_reward_lists.sh OUT USERS ROUNDS
#   experiments/compare_reward_lists.sh runs/cmp 50 2      # ~20 min on 2 cores
#   experiments/compare_reward_lists.sh runs/cmp200 200 1  # ~46 min
set -euo pipefail
out=${1:?run folder}; users=${2:?users}; rounds=${3:?rounds}
dpo4rec=${DPO4REC:-.venv/bin/dpo4rec}
A=$out/held_out; B=$out/train
$dpo4rec run --out "$A" --users "$users" --set run.rounds="$rounds"
mkdir -p "$B/round_0/recommender"
cp -r "$A/data" "$A/prompts" "$A/cache" "$B/"
cp -r "$A/round_0/knowledge" "$A/round_0/embeddings" "$B/round_0/"
cp -r "$A/round_0/recommender/prm" "$A/round_0/recommender/prm-no-knowledge" "$B/round_0/recommender/"
$dpo4rec run --out "$B" --users "$users" --set run.rounds="$rounds" --set align.reward_lists=train
$dpo4rec compare "$A" "$B" --json "$out/compare.json"
