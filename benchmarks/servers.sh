# Sourced by the benchmark shell scripts (run from the project root, with VLLM_PY, MODEL_DIR,
# NAME and OUT set): vLLM's CPU OpenAI server on port 8031, and waiting for servers' /health.

start_vllm() {
  VLLM_CPU_KVCACHE_SPACE=1 "$VLLM_PY" -m vllm.entrypoints.openai.api_server --model "$MODEL_DIR" \
    --served-model-name "$NAME" --dtype float32 --max-model-len 2048 --port 8031 --seed 0 \
    >"$OUT/vllm.log" 2>&1 &
  VLLM_PID=$!
}

wait_up() {  # every URL's /health answers within 10 minutes, or exit 1
  local url
  for url in "$@"; do
    for _ in $(seq 600); do
      curl -sf "$url/health" >/dev/null 2>&1 && break
      sleep 1
    done
    curl -sf "$url/health" >/dev/null || { echo "$url did not come up" >&2; exit 1; }
  done
}
