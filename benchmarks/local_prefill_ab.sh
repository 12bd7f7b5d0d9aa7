#!/usr/bin/env bash
# router.max_local_prefill_tokens side by side: configs/local.yaml with each limit in LIMITS,
# one after another, each measured against the same vLLM CPU server (started once) by
# `pdcluster bench --compare`. PART=streams: 32 streams x 64 tokens (prompts 16-48 tokens);
# PART=sweep: Poisson rates with a 500-token shared system prompt and the goodput SLO.
# Needs the vLLM venv (benchmarks/README.md: VLLM_PY, default /work/vllm-venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_PY=${VLLM_PY:-/work/vllm-venv/bin/python}
OUT=${OUT:-benchmarks/results/local_prefill_ab}
LIMITS=${LIMITS:-64 0}
PART=${PART:-streams}
DURATION=${DURATION:-90}
NAME=SmolLM2-135M-Instruct
MODEL_DIR=$(.venv/bin/pdcluster fetch-model --config configs/local.yaml --print-path | tail -1)
mkdir -p "$OUT"
if [ "$PART" = streams ]; then
  LOAD=(--concurrency 32 --prompt-tokens 16-48 --max-tokens 64)
else
  LOAD=(--rates "${RATES:-0.1,0.2,0.4}" --concurrency 64 --system-prompt-tokens 500
        --prompt-tokens 16-48 --max-tokens 32-96 --slo ttft=1,tpot=0.15)
fi

source benchmarks/servers.sh
start_vllm
PDX_PID=
trap 'kill -TERM $PDX_PID $VLLM_PID 2>/dev/null; wait $PDX_PID $VLLM_PID 2>/dev/null || true' EXIT

for n in $LIMITS; do
  cfg="$OUT/local_$n.yaml"
  sed "s/max_local_prefill_tokens: [0-9]*/max_local_prefill_tokens: $n/" configs/local.yaml >"$cfg"
  .venv/bin/pdcluster up "$cfg" >"$OUT/pdcluster_$n.log" 2>&1 &
  PDX_PID=$!
  wait_up http://127.0.0.1:8000 http://127.0.0.1:8031
  .venv/bin/pdcluster bench http://127.0.0.1:8000 --compare http://127.0.0.1:8031 --model "$NAME" \
    "${LOAD[@]}" --duration "$DURATION" --out "$OUT/${PART}_$n"
  curl -s http://127.0.0.1:8000/metrics | grep "^pdcluster_local_prefills_total" \
    >"$OUT/${PART}_$n/local_prefills.txt" || true
  kill -TERM $PDX_PID
  wait $PDX_PID || true
  PDX_PID=
  sleep 5
done
