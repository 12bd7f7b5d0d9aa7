#!/usr/bin/env bash
# What a request field costs: configs/local.yaml up once, then for each field in FIELDS
# `pdcluster bench --compare-extra FIELD` (the same endpoint without and with the field)
# at 32 streams x 64 tokens. Run from anywhere. SUFFIX names the run's directory apart
# (e.g. PROMPT_TOKENS=150-250 SUFFIX=_long). The second target runs on caches the first
# warmed (decode's prefix cache holds the prompts): EXTRA=FIELD FIELDS='{}' runs the
# other order (EXTRA: fields of the first target).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/field_cost}
DURATION=${DURATION:-60}
FIELDS=${FIELDS:-'{"logprobs":5}'}
PROMPT_TOKENS=${PROMPT_TOKENS:-16-48}  # "words"; configs/local.yaml prefills <= 64 tokens on decode
NAME=SmolLM2-135M-Instruct
mkdir -p "$OUT"
.venv/bin/pdcluster up configs/local.yaml >"$OUT/pdcluster.log" 2>&1 &
PDX_PID=$!
trap 'kill -TERM $PDX_PID 2>/dev/null; wait $PDX_PID 2>/dev/null || true' EXIT
source benchmarks/servers.sh
wait_up http://127.0.0.1:8000
for field in $FIELDS; do
  name=${LABEL:-$(echo "$field" | tr -cd 'a-z0-9_')}  # LABEL names a long field's directory
  .venv/bin/pdcluster bench http://127.0.0.1:8000 --extra "${EXTRA:-{\}}" --compare-extra "$field" \
    --model "$NAME" \
    --concurrency 32 --prompt-tokens "$PROMPT_TOKENS" --max-tokens 64 --duration "$DURATION" \
    --out "$OUT/$name${SUFFIX:-}"
done
