"""Admission with the tiny model's real tokenizer and chat template (cluster/admission.py):
chat options vLLM users send (the developer role, add_generation_prompt,
continue_final_message, chat_template_kwargs), completions' echo, unknown fields,
the served model's name, and vLLM's /tokenize and /detokenize bodies."""

from __future__ import annotations

import json

import pytest
from transformers import PreTrainedTokenizerFast

from chaos.config import cluster_config
from cluster.admission import Admission
from cluster.protocol import AdmissionError
from tests.support import load_test_config


def _admission(tiny_model_dir, **router) -> Admission:
    cfg = cluster_config(load_test_config("tiny.yaml", router=router))
    tok = PreTrainedTokenizerFast.from_pretrained(tiny_model_dir)
    return Admission(cfg, tok, str(tiny_model_dir))


@pytest.fixture(scope="module")
def adm(tiny_model_dir) -> Admission:
    return _admission(tiny_model_dir)


def chat(messages, **kw) -> bytes:
    return json.dumps({"model": "tiny-llama", "messages": messages, **kw}).encode()


def template(adm: Admission, messages, **kw) -> list[int]:
    return list(adm.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **kw))


USER = {"role": "user", "content": "hello there"}


def test_the_developer_role_is_templated_as_the_system_role(adm):
    got = adm.admit(chat([{"role": "developer", "content": "be brief"}, USER]), True)
    want = template(
        adm, [{"role": "system", "content": "be brief"}, USER], add_generation_prompt=True
    )
    assert got.choices[0].prompt_ids == want


def test_add_generation_prompt_false_and_continue_final_message(adm):
    plain = adm.admit(chat([USER], add_generation_prompt=False), True).choices[0].prompt_ids
    assert plain == template(adm, [USER], add_generation_prompt=False)
    assert plain != adm.admit(chat([USER]), True).choices[0].prompt_ids
    partial = {"role": "assistant", "content": "The answer is"}
    cont = adm.admit(chat([USER, partial], continue_final_message=True), True).choices[0].prompt_ids
    text = adm.tokenizer.decode(cont)
    assert text.endswith("The answer is")  # no end of turn, no new assistant turn
    with pytest.raises(AdmissionError) as ei:
        adm.admit(chat([USER], continue_final_message=True), True)
    assert ei.value.param == "continue_final_message"
    with pytest.raises(AdmissionError):
        adm.admit(
            chat([USER, partial], continue_final_message=True, add_generation_prompt=True), True
        )


def test_chat_template_kwargs_reach_the_template_but_cannot_set_its_own_arguments(adm):
    ok = adm.admit(chat([USER], chat_template_kwargs={"enable_thinking": False}), True)
    assert (
        ok.choices[0].prompt_ids == adm.admit(chat([USER]), True).choices[0].prompt_ids
    )  # unused by this template
    with pytest.raises(AdmissionError) as ei:
        adm.admit(chat([USER], chat_template_kwargs={"tokenize": False}), True)
    assert ei.value.param == "chat_template_kwargs" and ei.value.status == 400


def test_a_model_that_is_not_served_is_a_404_in_openais_shape(adm):
    with pytest.raises(AdmissionError) as ei:
        adm.admit(json.dumps({"model": "gpt-4", "prompt": "hi"}).encode(), False)
    e = ei.value
    assert (e.status, e.code, e.param) == (404, "model_not_found", "model")
    assert json.loads(e.to_json())["error"]["message"] == "The model `gpt-4` does not exist."


def test_echo_returns_the_prompt_text_before_the_completion(adm):
    body = {"model": "tiny-llama", "prompt": "once upon", "echo": True}
    assert adm.admit(json.dumps(body).encode(), False).choices[0].echo == "once upon"
    ids = adm.tokenizer.encode("a time")
    body = {"model": "tiny-llama", "prompt": ids, "echo": True}
    assert adm.admit(json.dumps(body).encode(), False).choices[0].echo == adm.tokenizer.decode(ids)
    assert adm.admit(json.dumps({**body, "echo": False}).encode(), False).choices[0].echo == ""


def test_unknown_fields_are_ignored_unless_strict_fields(adm, tiny_model_dir):
    body = json.dumps({"model": "tiny-llama", "prompt": "hi", "top_a": 0.2}).encode()
    assert adm.admit(body, False).ignored == ("top_a",)
    strict = _admission(tiny_model_dir, strict_fields=True)
    with pytest.raises(AdmissionError) as ei:
        strict.admit(body, False)
    assert (ei.value.status, ei.value.param) == (400, "top_a")


def test_tokenize_and_detokenize_as_vllm_answers_them(adm):
    out = json.loads(adm.tokenize_body(b'{"model": "tiny-llama", "prompt": "hello there"}'))
    assert out["tokens"] == adm.tokenizer.encode("hello there")
    assert out["count"] == len(out["tokens"]) and out["max_model_len"] == 512
    assert out["token_strs"] is None
    back = json.loads(adm.detokenize_body(json.dumps({"tokens": out["tokens"]}).encode()))
    assert back == {"prompt": "hello there"}
    # Chat messages: the same ids a chat completion's prompt is.
    out = json.loads(adm.tokenize_body(chat([USER], return_token_strs=True)))
    assert out["tokens"] == adm.admit(chat([USER]), True).choices[0].prompt_ids
    assert out["token_strs"] == adm.tokenizer.convert_ids_to_tokens(out["tokens"])
    for body, param in (
        (b'{"prompt": "x", "messages": [{"role": "user", "content": "y"}]}', "prompt"),
        (b'{"model": "other", "prompt": "x"}', "model"),
        (b'{"tokens": [1, 99999999]}', "tokens"),
    ):
        with pytest.raises(AdmissionError) as ei:
            (adm.detokenize_body if b"tokens" in body else adm.tokenize_body)(body)
        assert ei.value.param == param


def test_a_batch_of_prompts_is_one_choice_each_with_its_own_length_budget(adm):
    """/v1/completions with a list of strings and token-id lists: each prompt a choice,
    tokenized alone, its max_tokens clamped to its own room; over MAX_PROMPTS a 400."""
    from cluster.policy import MAX_PROMPTS

    ids = adm.tokenizer.encode("second one")
    long = "word " * 100
    body = {"model": "tiny-llama", "prompt": ["first", ids, long], "max_tokens": 480}
    got = adm.admit(json.dumps(body).encode(), False).choices
    assert [c.prompt_ids for c in got] == [
        adm.tokenizer.encode("first"),
        ids,
        adm.tokenizer.encode(long),
    ]
    assert [c.params.max_tokens for c in got] == [min(480, 512 - len(c.prompt_ids)) for c in got]
    with pytest.raises(AdmissionError) as ei:
        adm.admit(json.dumps({**body, "prompt": ["x"] * (MAX_PROMPTS + 1)}).encode(), False)
    assert ei.value.param == "prompt"
    with pytest.raises(AdmissionError):
        adm.admit(json.dumps({**body, "prompt": ["ok", ""]}).encode(), False)


def test_client_input_that_breaks_the_template_or_ids_is_a_400_never_a_500(adm):
    """Template variables that collide with what Hugging Face passes the template
    (messages, raise_exception, the special tokens), a logit_bias key that is not a
    plain token id, and a /detokenize list longer than the context: each a 400."""
    for kwargs in ({"messages": []}, {"raise_exception": "x"}, {"bos_token": 5}):
        with pytest.raises(AdmissionError) as ei:
            adm.admit(chat([USER], chat_template_kwargs=kwargs), True)
        assert ei.value.status == 400 and ei.value.param == "chat_template_kwargs", kwargs
    deep: dict = {}
    for _ in range(800):
        deep = {"a": deep}
    with pytest.raises(AdmissionError) as ei:
        adm.admit(chat([USER], chat_template_kwargs={"x": deep}), True)
    assert ei.value.status == 400
    for key in ("²", "1" * 5000, "-1"):
        with pytest.raises(AdmissionError) as ei:
            adm.admit(chat([USER], logit_bias={key: 1}), True)
        assert ei.value.param == "logit_bias"
    with pytest.raises(AdmissionError) as ei:
        adm.detokenize_body(json.dumps({"tokens": [1] * 513}).encode())
    assert ei.value.param == "tokens"
    ok = adm.admit(chat([USER], allowed_token_ids=[7] * 1000 + [3]), True)
    assert ok.choices[0].params.allowed_token_ids == [3, 7]  # each id once


def comp(**kw) -> bytes:
    return json.dumps({"model": "tiny-llama", **kw}).encode()


def test_n_and_best_of_give_each_run_its_own_seed_and_best_of_ranks_by_logprobs(adm):
    got = adm.admit(comp(prompt=["a", "b"], n=2, seed=7), False).choices
    assert [(c.prompt_index, c.params.seed) for c in got] == [(0, 7), (0, 8), (1, 7), (1, 8)]
    assert all(c.params.logprobs is None for c in got)
    runs = adm.admit(comp(prompt="a", n=1, best_of=3), False).choices
    assert len(runs) == 3 and all(c.params.logprobs == 0 for c in runs)  # to rank them
    assert all(c.params.seed is None for c in runs)


def test_echo_with_max_tokens_0_scores_the_prompt(adm):
    (c,) = adm.admit(comp(prompt="score me", echo=True, max_tokens=0, logprobs=1), False).choices
    assert c.params.max_tokens == 1 and c.params.prompt_logprobs == 1
    with pytest.raises(AdmissionError) as ei:
        adm.admit(comp(prompt="score me", max_tokens=0), False)  # without echo: nothing to do
    assert ei.value.param == "max_tokens"


def test_prompt_logprobs_are_bounded_per_request(adm):
    """At most max_model_len x 21 entries of prompt logprobs in one request's answer."""
    prompt = list(range(3, 203))  # 200 tokens; tiny.yaml: max_model_len 512
    ok = adm.admit(comp(prompt=[prompt] * 2, echo=True, logprobs=20, max_tokens=1), False)
    assert len(ok.choices) == 2
    with pytest.raises(AdmissionError) as ei:  # 3 x 200 x 21 > 512 x 21
        adm.admit(comp(prompt=[prompt] * 3, echo=True, logprobs=20, max_tokens=1), False)
    assert ei.value.param == "echo"
    with pytest.raises(AdmissionError) as ei:
        adm.admit(comp(prompt=prompt, prompt_logprobs=20, n=3, max_tokens=1), False)
    assert ei.value.param == "prompt_logprobs"
