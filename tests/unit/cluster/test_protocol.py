"""Admission (parse + policy + ranges), sampling params, and response shapes
(cluster/protocol.py, cluster/admission.py, cluster/responses.py)."""

from __future__ import annotations

import json

import msgspec
import pytest
from openai._models import construct_type
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from cluster import policy, protocol, responses, structured
from cluster.admission import to_sampling_params
from wire.sampling_params import SamplingParams


def parse_chat(body: bytes, **kw):
    return protocol.parse_chat(body, **kw).request


def parse_completion(body: bytes, **kw):
    return protocol.parse_completion(body, **kw).request


def chat_body(**kw) -> bytes:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    body.update(kw)
    return json.dumps(body).encode()


def comp_body(**kw) -> bytes:
    body = {"model": "m", "prompt": "hello"}
    body.update(kw)
    return json.dumps(body).encode()


def chat_err(**kw) -> protocol.AdmissionError:
    with pytest.raises(protocol.AdmissionError) as ei:
        parse_chat(chat_body(**kw))
    assert ei.value.status == 400
    return ei.value


def comp_err(**kw) -> protocol.AdmissionError:
    with pytest.raises(protocol.AdmissionError) as ei:
        parse_completion(comp_body(**kw))
    assert ei.value.status == 400
    return ei.value


# ---- parsing ----------------------------------------------------------------


def test_valid_chat_parses_with_ignorable_fields():
    req = parse_chat(
        chat_body(
            messages=[
                {"role": "system", "content": "be brief"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
                {"role": "assistant", "content": "ok", "name": "bot"},
                {"role": "user", "content": "go"},
            ],
            max_tokens=5,
            temperature=0,
            top_p=0.5,
            stop=["x"],
            seed=3,
            stream=True,
            stream_options={"include_usage": True},
            user="u",
            service_tier="auto",
            metadata={"k": "v"},
            store=False,
            parallel_tool_calls=True,
            n=1,
            tools=[],
            tool_choice="none",
            response_format={"type": "text"},
            logprobs=False,
            presence_penalty=0,
            top_k=0,
            min_p=0.0,
            repetition_penalty=1.0,
            ignore_eos=True,
        )
    )
    assert req.stream and req.stream_options.include_usage
    assert [m.role for m in req.messages] == ["system", "user", "assistant", "user"]
    assert policy.message_text(req.messages[1]) == "a\nb"
    assert policy.message_text(req.messages[0]) == "be brief"


def test_valid_completion_prompt_forms():
    assert parse_completion(comp_body()).prompt == ["hello"]
    assert parse_completion(comp_body(prompt=[1, 2, 3])).prompt == [[1, 2, 3]]
    assert parse_completion(comp_body(prompt=["one"])).prompt == ["one"]
    assert parse_completion(comp_body(prompt=[[4, 5]])).prompt == [[4, 5]]
    assert parse_completion(comp_body(prompt=["a", [6], "b"])).prompt == ["a", [6], "b"]
    req = parse_completion(comp_body(echo=False, suffix="", best_of=1, max_tokens=3))
    assert req.max_tokens == 3


def test_unknown_fields_are_ignored_and_named_as_vllm_does():
    """An SDK's `extra_body` keys and fields of newer API versions: accepted, the request
    served as without them, and every one of them named, nested ones by their path."""
    body = chat_body(
        bogus_field=1,
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "x", "cache_control": {}}]},
            {"role": "assistant", "content": "y", "colour": "red"},
        ],
        stream_options={"include_usage": True, "continuous_usage_stats": True},
    )
    parsed = protocol.parse_chat(body)
    assert parsed.ignored == (
        "bogus_field",
        "stream_options.continuous_usage_stats",
        "messages[0].content[0].cache_control",
        "messages[1].colour",
    )
    assert parsed.request.stream_options.include_usage is True
    assert protocol.parse_completion(comp_body(max_tokens=3)).ignored == ()


def test_strict_fields_makes_an_unknown_field_a_400_naming_it():
    with pytest.raises(protocol.AdmissionError) as ei:
        protocol.parse_chat(chat_body(bogus_field=1), strict=True)
    e = ei.value
    assert "bogus_field" in e.message and e.param == "bogus_field"
    assert e.code == "unknown_parameter" and e.status == 400
    with pytest.raises(protocol.AdmissionError) as ei:
        protocol.parse_completion(comp_body(stream_options={"extra": 1}), strict=True)
    assert ei.value.param == "stream_options.extra"


def test_wrong_type_names_the_path():
    e = chat_err(max_tokens="ten")
    assert "`$.max_tokens`" in e.message and e.param == "max_tokens"
    e = chat_err(messages=[{"role": "user", "content": 5}])
    assert e.param == "messages[0].content"
    e = chat_err(temperature=True)
    assert e.param == "temperature"


def test_missing_required_and_bad_json():
    with pytest.raises(protocol.AdmissionError) as ei:
        parse_chat(b'{"messages": [{"role": "user", "content": "x"}]}')
    assert ei.value.param == "model" and ei.value.code == "missing_required_parameter"
    with pytest.raises(protocol.AdmissionError) as ei:
        parse_chat(b'{"model": "m"}')
    assert ei.value.param == "messages"
    with pytest.raises(protocol.AdmissionError) as ei:
        parse_completion(b'{"model": "m"')
    assert ei.value.param is None and "JSON" in ei.value.message
    with pytest.raises(protocol.AdmissionError):
        parse_completion(b"[1, 2]")


@pytest.mark.parametrize(
    "kw,param",
    [
        ({"n": 0}, "n"),
        ({"n": 129}, "n"),
        ({"use_beam_search": True}, "use_beam_search"),
        ({"function_call": "auto"}, "function_call"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"echo": True}, "echo"),
    ],
)
def test_unimplemented_fields_that_matter_are_400(kw, param):
    e = chat_err(**kw)
    assert e.param == param, e


def test_tool_choice_auto_without_tools_is_plain_text():
    assert parse_chat(chat_body(tool_choice="auto")).tool_choice == "auto"


@pytest.mark.parametrize(
    "kw,param",
    [
        ({"suffix": "end"}, "suffix"),
        ({"n": 3, "best_of": 2}, "best_of"),  # fewer runs than choices
        ({"best_of": 3, "stream": True}, "best_of"),  # the best is known only at the end
    ],
)
def test_completion_unimplemented_fields_are_400(kw, param):
    assert comp_err(**kw).param == param


@pytest.mark.parametrize(
    "chat,kw,param",
    [
        (True, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        (True, {"top_logprobs": 3}, "top_logprobs"),  # without logprobs: true
        (True, {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        (False, {"logprobs": 21}, "logprobs"),
        (False, {"logprobs": -1}, "logprobs"),
        (False, {"prompt_logprobs": 21}, "prompt_logprobs"),
        (False, {"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
        (True, {"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ],
)
def test_logprobs_ranges(chat, kw, param):
    assert (chat_err if chat else comp_err)(**kw).param == param


def test_logprobs_asked():
    from cluster.policy import logprobs_asked

    assert logprobs_asked(parse_chat(chat_body())) == (None, None)
    assert logprobs_asked(parse_chat(chat_body(logprobs=True))) == (0, None)
    assert logprobs_asked(parse_chat(chat_body(logprobs=True, top_logprobs=4))) == (4, None)
    assert logprobs_asked(parse_chat(chat_body(logprobs=False, prompt_logprobs=2))) == (None, 2)
    assert logprobs_asked(parse_completion(comp_body(logprobs=0))) == (0, None)
    # echo with logprobs asks for the prompt's too, at the larger of the two counts
    assert logprobs_asked(parse_completion(comp_body(logprobs=3, echo=True))) == (3, 3)
    asked = parse_completion(comp_body(logprobs=1, echo=True, prompt_logprobs=5))
    assert logprobs_asked(asked) == (1, 5)
    assert logprobs_asked(parse_completion(comp_body(echo=True))) == (None, None)


@pytest.mark.parametrize("role", ["bogus", "function"])
def test_bad_roles_are_400(role):
    e = chat_err(messages=[{"role": role, "content": "x"}])
    assert e.param == "messages[0].role"


def test_message_checks():
    assert chat_err(messages=[]).param == "messages"
    assert chat_err(messages=[{"role": "user", "content": None}]).param == "messages[0].content"
    e = chat_err(
        messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}
        ]
    )
    assert e.param == "messages[0].content[0].type"
    e = chat_err(messages=[{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}])
    assert "tool" in e.message


@pytest.mark.parametrize(
    "kw,param",
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": ""}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop": ["x" * 257]}, "stop"),  # longer stop strings cost the checker per token
        ({"stop_token_ids": list(range(257))}, "stop_token_ids"),
        ({"seed": 2**64}, "seed"),
    ],
)
def test_ranges(kw, param):
    assert chat_err(**kw).param == param


def test_range_edges_accepted():
    for kw in (
        {"temperature": 0},
        {"temperature": 2},
        {"top_p": 1},
        {"top_k": -1},
        {"top_k": 1},
        {"max_tokens": 1},
        {"min_tokens": 0},
        {"stop": "x"},
        {"stop": ["a", "b", "c", "d"]},
        {"seed": -1},
        {"min_tokens": 5, "max_tokens": 5},
    ):
        parse_chat(chat_body(**kw))


def test_sampling_knobs_out_of_range_are_400_naming_them():
    for kw, param in (
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"min_p": 1.5}, "min_p"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"3": 101}}, "logit_bias"),
        ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"bad_words": [" "]}, "bad_words"),
        ({"bad_words": ["w"] * 65}, "bad_words"),
    ):
        assert chat_err(**kw).param == param, kw
    ok = parse_chat(
        chat_body(
            presence_penalty=0.5,
            frequency_penalty=-1,
            repetition_penalty=1.2,
            min_p=0.1,
            logit_bias={"42": 10},
            allowed_token_ids=[1, 2],
            bad_words=["no"],
        )
    )
    assert ok.logit_bias == {"42": 10}


def test_completion_prompt_checks():
    assert comp_err(prompt="").param == "prompt"
    assert comp_err(prompt=[]).param == "prompt"
    assert comp_err(prompt=[1, "a"]).param == "prompt"
    assert comp_err(prompt=[-3]).param == "prompt"


# ---- sampling params ---------------------------------------------------------


def sp(body: bytes, chat=True, prompt_len=10, max_model_len=100, default=50, strict=False):
    req = parse_chat(body) if chat else parse_completion(body)
    return to_sampling_params(
        req,
        prompt_len=prompt_len,
        max_model_len=max_model_len,
        default_max_tokens=default,
        strict=strict,
    )


def test_sampling_defaults():
    p = sp(chat_body())
    assert p == SamplingParams(max_tokens=50, temperature=1.0, top_p=1.0, top_k=-1)
    p = sp(
        chat_body(
            temperature=0,
            top_k=0,
            stop="##",
            stop_token_ids=[7],
            seed=9,
            min_tokens=2,
            max_completion_tokens=20,
            max_tokens=30,
            include_stop_str_in_output=True,
            skip_special_tokens=False,
        )
    )
    assert (
        p.temperature,
        p.top_k,
        p.stop,
        p.stop_token_ids,
        p.seed,
        p.min_tokens,
        p.max_tokens,
        p.include_stop_str_in_output,
        p.skip_special_tokens,
    ) == (0.0, -1, ["##"], [7], 9, 2, 20, True, False)
    # SamplingParams crosses to the workers: it round-trips through msgpack/pickle.
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(p), type=SamplingParams) == p


def test_clamp_vs_strict():
    assert sp(chat_body(max_tokens=500)).max_tokens == 90  # clamped to the room left
    with pytest.raises(protocol.AdmissionError) as ei:
        sp(chat_body(max_tokens=500), strict=True)
    assert ei.value.param == "max_tokens" and ei.value.code == "context_length_exceeded"
    # The default is always clamped, even when strict: the client did not ask for it.
    assert sp(chat_body(), default=512, strict=True).max_tokens == 90
    assert sp(chat_body(max_tokens=90), strict=True).max_tokens == 90


def test_prompt_too_long():
    for plen in (100, 150):
        with pytest.raises(protocol.AdmissionError) as ei:
            sp(comp_body(), chat=False, prompt_len=plen)
        e = ei.value
        assert e.param == "prompt" and e.code == "context_length_exceeded"
        assert str(plen) in e.message and "100" in e.message
    with pytest.raises(protocol.AdmissionError) as ei:
        sp(chat_body(), prompt_len=100)
    assert ei.value.param == "messages"


# ---- errors and responses ------------------------------------------------------


def test_error_shape():
    e = chat_err(n=0)
    body = json.loads(e.to_json())
    assert set(body) == {"error"}
    assert body["error"] == {
        "message": e.message,
        "type": "invalid_request_error",
        "param": "n",
        "code": e.code,
    }
    body = json.loads(responses.error_body("slow down", "rate_limit_error", code="queue_full"))
    assert body == {
        "error": {
            "message": "slow down",
            "type": "rate_limit_error",
            "param": None,
            "code": "queue_full",
        }
    }
    assert responses.error_type_for(429) == "rate_limit_error"
    assert responses.error_type_for(400) == "invalid_request_error"


USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_chat_completion_parses_with_openai_types():
    c = ChatCompletion.model_validate_json(
        responses.completion(
            True, "chatcmpl-ab12", "m", [("hello", "length", None, None, None)], USAGE
        )
    )
    assert c.object == "chat.completion" and c.choices[0].message.content == "hello"
    assert c.choices[0].message.role == "assistant" and c.choices[0].finish_reason == "length"
    assert c.usage.total_tokens == 5 and c.choices[0].logprobs is None


def test_text_completion_parses_with_openai_types():
    c = Completion.model_validate_json(
        responses.completion(False, "cmpl-1", "m", [("hi", "stop", None, None, None)], USAGE)
    )
    assert c.object == "text_completion" and c.choices[0].text == "hi"
    assert c.choices[0].finish_reason == "stop" and c.usage.prompt_tokens == 3


def _events(raw: bytes) -> list[dict]:
    assert raw.endswith(b"\n\n")
    out = []
    for ev in raw.split(b"\n\n")[:-1]:
        assert ev.startswith(b"data: ")
        out.append(ev[len(b"data: ") :])
    return out


def test_chat_stream_chunks_parse_with_openai_types():
    stream = b"".join(
        [
            responses.sse(
                responses.chunk(True, "chatcmpl-1", "m", 7, None, None, role="assistant")
            ),
            responses.sse(responses.chunk(True, "chatcmpl-1", "m", 7, "Hel", None)),
            responses.sse(responses.chunk(True, "chatcmpl-1", "m", 7, "lo", None)),
            responses.sse(responses.chunk(True, "chatcmpl-1", "m", 7, "", "stop")),
            responses.sse(responses.usage_chunk(True, "chatcmpl-1", "m", 7, USAGE)),
            responses.SSE_DONE,
        ]
    )
    *events, done = _events(stream)
    assert done == b"[DONE]"
    chunks = [ChatCompletionChunk.model_validate_json(e) for e in events]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == "Hello"
    assert chunks[3].choices[0].finish_reason == "stop"
    assert json.loads(events[3])["choices"][0]["delta"] == {}
    assert chunks[4].choices == [] and chunks[4].usage.completion_tokens == 2


def test_completion_stream_chunks_parse_with_openai_types():
    events = _events(
        responses.sse(responses.chunk(False, "cmpl-1", "m", 7, "ab", None))
        + responses.sse(responses.chunk(False, "cmpl-1", "m", 7, None, "length"))
        + responses.sse(responses.usage_chunk(False, "cmpl-1", "m", 7, USAGE))
    )
    # OpenAI's own stream sends finish_reason null mid-stream, which the strict
    # Completion type rejects; the client builds chunks leniently (construct_type),
    # so check the last chunks strictly and all of them the way the client does.
    Completion.model_validate_json(events[1])
    Completion.model_validate_json(events[2])
    chunks = [construct_type(value=json.loads(e), type_=Completion) for e in events]
    assert all(isinstance(c, Completion) for c in chunks)
    assert chunks[0].choices[0].text == "ab" and chunks[0].choices[0].finish_reason is None
    assert chunks[1].choices[0].finish_reason == "length"
    assert chunks[2].choices == [] and chunks[2].usage.total_tokens == 5


def test_models_list():
    body = json.loads(responses.models_list("smol"))
    assert body["object"] == "list"
    m = Model.model_validate(body["data"][0])
    assert m.id == "smol" and m.object == "model"


def test_token_ids_outside_the_vocabulary_are_refused_before_any_worker():
    """Out-of-vocabulary stop ids (an index error in a worker's sampler, a device
    assert on CUDA) and a min_tokens ban of the whole vocabulary are 400s here."""
    for kw in (
        {"stop_token_ids": [99_999_999]},
        {"stop_token_ids": list(range(8)), "min_tokens": 1},
    ):
        req = parse_chat(chat_body(max_tokens=4, **kw))
        with pytest.raises(protocol.AdmissionError) as ei:
            to_sampling_params(
                req,
                prompt_len=3,
                max_model_len=64,
                default_max_tokens=8,
                strict=False,
                vocab_size=8,
            )
        assert ei.value.status == 400 and ei.value.param == "stop_token_ids"


# ---- bodies that cost without content --------------------------------------------


def test_deep_nesting_is_400_not_recursion_error():
    """JSON nested 5,000 deep in any field typed `Any` (or where the struct skips it)."""
    deep = "[" * 5000 + "]" * 5000
    bodies = [
        (protocol.parse_chat, chat_body(response_format="@")),
        (protocol.parse_chat, chat_body(tool_choice="@")),
        (protocol.parse_chat, chat_body(messages=[{"role": "user", "content": "x", "audio": "@"}])),
        (protocol.parse_completion, comp_body(logits_processors="@")),
        (protocol.parse_completion, comp_body(guided_json="@")),
    ]
    for parse, body in bodies:
        with pytest.raises(protocol.AdmissionError) as ei:
            parse(body.replace(b'"@"', deep.encode()))
        assert ei.value.status == 400 and "nested" in ei.value.message, ei.value
    # Just inside what decodes: refused by policy, and the message still shows a value.
    ok_depth = "[" * 900 + "]" * 900
    with pytest.raises(protocol.AdmissionError) as ei:
        parse_chat(chat_body(logits_processors="@").replace(b'"@"', ok_depth.encode()))
    assert ei.value.param == "logits_processors"
    with pytest.raises(protocol.AdmissionError) as ei:  # and by structured output
        structured.grammar_of(
            parse_chat(chat_body(response_format="@").replace(b'"@"', ok_depth.encode()))
        )
    assert ei.value.param == "response_format"


def test_many_empty_messages_are_refused_before_they_are_built():
    """A 4 MiB body of ~180,000 empty messages (or content parts) is refused naming
    router.max_messages, in well under 50 ms of CPU: before msgspec builds a struct
    per message and before any check loops over them."""
    import time

    one = [{"role": "user", "content": "hi"}]
    many = chat_body(messages=one + [{"role": "assistant"}] * 180_000)
    parts = chat_body(
        messages=[{"role": "user", "content": [{"type": "text", "text": ""}] * 150_000}]
    )
    assert len(many) > 3.5 * 2**20 and len(parts) > 3.5 * 2**20
    for body in (many, parts):
        t0 = time.thread_time()
        with pytest.raises(protocol.AdmissionError) as ei:
            parse_chat(body, max_messages=1024)
        cpu = time.thread_time() - t0
        assert ei.value.param == "messages" and "router.max_messages" in ei.value.message
        assert ei.value.code == "too_many_messages" and cpu < 0.05, (ei.value, cpu)
    # At the limit it parses; one more (message or part) is refused.
    body = chat_body(messages=one + [{"role": "assistant"}] * 1023)
    assert len(parse_chat(body, max_messages=1024).messages) == 1024
    two_parts = [{"role": "user", "content": [{"type": "text", "text": "a"}] * 2}]
    with pytest.raises(protocol.AdmissionError):
        parse_chat(
            chat_body(messages=two_parts + [{"role": "assistant"}] * 1022), max_messages=1024
        )
    # A body whose messages are not a list still gets the decoder's own message.
    assert "messages" in chat_err(messages={"role": "user"}).message


def test_cache_salt_reaches_the_workers_and_an_empty_one_is_refused():
    assert sp(chat_body(cache_salt="tenant-a")).cache_salt == "tenant-a"
    assert sp(chat_body()).cache_salt is None
    assert sp(chat_body(cache_salt="t"), chat=True) != sp(chat_body(cache_salt="u"))
    with pytest.raises(protocol.AdmissionError) as e:
        sp(chat_body(cache_salt=""))
    assert e.value.param == "cache_salt" and e.value.status == 400


def test_an_unknown_field_nested_too_deeply_is_a_400_not_a_crash():
    """Unknown fields are skipped, not refused: JSON nested 5,000 deep inside one (at
    the top or inside a message) is still a 400 naming the nesting, never a 500."""
    deep = "[" * 5000 + "]" * 5000
    for body in (
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "zz": "@"},
        {"model": "m", "messages": [{"role": "user", "content": "hi", "zz": "@"}]},
    ):
        raw = json.dumps(body).replace('"@"', deep).encode()
        with pytest.raises(protocol.AdmissionError) as ei:
            protocol.parse_chat(raw)
        assert ei.value.status == 400 and "nested" in ei.value.message


def test_the_ignored_fields_header_is_bounded_and_carries_only_printable_ascii():
    """Field names come from the client: none may smuggle a header line or an unbounded
    value; what is left out is counted."""
    assert responses.ignored_fields_header(("top_a", "mirostat")) == "top_a, mirostat"
    assert responses.ignored_fields_header(("foo", "bär")) == "foo, ... (2 in all)"
    evil = responses.ignored_fields_header(("a\r\nX-Evil: 1",))
    assert "\r" not in evil and "\n" not in evil
    many = responses.ignored_fields_header(tuple(f"f{i}" for i in range(5000)))
    assert len(many) <= responses.IGNORED_HEADER_CHARS and many.endswith("(5000 in all)")
