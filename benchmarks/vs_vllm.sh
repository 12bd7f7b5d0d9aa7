#!/usr/bin/env bash
# pdcluster (configs/local.yaml: SmolLM2-135M-Instruct, 1 prefill + 1 decode, NIXL) against
# vLLM's CPU OpenAI server on the same model, same machine, same run, both measured by
# `pdcluster bench --compare` (interleaved: the endpoints alternate going first per point).
#   1. 32 streams x 64 tokens, greedy (closed loop): output tok/s.
#   2. Poisson sweep with a 500-token shared system prompt, goodput at TTFT <= 1 s and
#      TPOT <= 150 ms.
# Needs the vLLM venv (benchmarks/README.md: VLLM_PY, default /work/vllm-venv/bin/python).
# Both servers are stopped by pid at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_PY=${VLLM_PY:-/work/vllm-venv/bin/python}
OUT=${OUT:-benchmarks/results/vs_vllm}
DURATION=${DURATION:-40}
RATES=${RATES:-0.5,1,2,4}
NAME=SmolLM2-135M-Instruct
MODEL_DIR=$(.venv/bin/pdcluster fetch-model --config configs/local.yaml --print-path | tail -1)
mkdir -p "$OUT"

source benchmarks/servers.sh
start_vllm
.venv/bin/pdcluster up configs/local.yaml >"$OUT/pdcluster.log" 2>&1 &
PDX_PID=$!
trap 'kill -TERM $PDX_PID $VLLM_PID 2>/dev/null; wait $PDX_PID $VLLM_PID 2>/dev/null || true' EXIT
wait_up http://127.0.0.1:8000 http://127.0.0.1:8031

.venv/bin/pdcluster bench http://127.0.0.1:8000 --compare http://127.0.0.1:8031 --model "$NAME" \
  --concurrency 32 --prompt-tokens 16-48 --max-tokens 64 --duration "$DURATION" \
  --out "$OUT/streams32"
.venv/bin/pdcluster bench http://127.0.0.1:8000 --compare http://127.0.0.1:8031 --model "$NAME" \
  --rates "$RATES" --concurrency 64 --system-prompt-tokens 500 --prompt-tokens 16-48 \
  --max-tokens 32-96 --slo ttft=1,tpot=0.15 --duration "$DURATION" --out "$OUT/sweep"
