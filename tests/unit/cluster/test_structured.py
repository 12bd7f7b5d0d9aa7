"""Structured output and tools at admission, with the tiny model's real tokenizer and
template (cluster/structured.py, cluster/tools.py): every way of asking for a format
becomes one grammar, a format llguidance cannot compile is a 400 naming the reason,
tools reach the prompt, and answers read back as OpenAI's tool calls, whole or
streamed."""

from __future__ import annotations

import json

import llguidance
import pytest

from cluster import tools
from cluster.protocol import AdmissionError
from tests.unit.cluster.test_admission import USER, _admission, chat

SCHEMA = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "the weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}


@pytest.fixture(scope="module")
def adm(tiny_model_dir):
    return _admission(tiny_model_dir)


def grammar(adm, **kw) -> str | None:
    return adm.admit(chat([USER], **kw), True).choices[0].params.grammar


def accepts(grammar_text: str, adm, text: str) -> bool:
    tok = adm.grammars._tokenizer
    m = llguidance.LLMatcher(tok, grammar_text)
    return m.consume_tokens(tok.tokenize_str(text)) and m.is_accepting()


@pytest.mark.parametrize(
    "kw,good,bad",
    [
        ({"response_format": {"type": "json_object"}}, '{"a": 1}', "[1]"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "s", "schema": SCHEMA},
                }
            },
            '{"x": 3}',
            '{"x": "3"}',
        ),
        ({"structured_outputs": {"json": SCHEMA}}, '{"x": 3}', '{"y": 3}'),
        ({"structured_outputs": {"regex": "[0-9]{3}"}}, "123", "12a"),
        ({"structured_outputs": {"choice": ["yes", "no"]}}, "no", "maybe"),
        ({"structured_outputs": {"grammar": 'root ::= "a" "b"*'}}, "abbb", "ba"),  # GBNF
        ({"structured_outputs": {"grammar": 'start: "a" "b"*'}}, "abb", "b"),  # Lark
        ({"guided_json": json.dumps(SCHEMA)}, '{"x": 3}', "{}"),
        ({"guided_regex": "a+"}, "aaa", "b"),
        ({"guided_choice": ["a b", "c"]}, "a b", "a"),
        ({"guided_grammar": 'root ::= "x"'}, "x", "y"),
    ],
)
def test_every_way_of_asking_is_one_grammar(adm, kw, good, bad):
    g = grammar(adm, **kw)
    assert g is not None
    assert accepts(g, adm, good) and not accepts(g, adm, bad)


def test_the_same_fields_work_on_completions(adm):
    body = json.dumps({"model": "tiny-llama", "prompt": "x", "guided_choice": ["a", "b"]})
    assert adm.admit(body.encode(), False).choices[0].params.grammar is not None


def test_text_and_no_format_are_free_text(adm):
    assert grammar(adm) is None
    assert grammar(adm, response_format={"type": "text"}) is None


@pytest.mark.parametrize(
    "kw,param,words",
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "s", "schema": {"type": "strin"}},
                }
            },
            "response_format",
            "strin",
        ),
        ({"structured_outputs": {"regex": "(a"}}, "structured_outputs", "unclosed"),
        ({"guided_grammar": "root ::= ("}, "guided_grammar", "grammar"),
        ({"guided_json": "{not json"}, "guided_json", "JSON"),
        ({"response_format": {"type": "xml"}}, "response_format", "json_schema"),
        (
            {"structured_outputs": {"regex": "a", "choice": ["b"]}},
            "structured_outputs",
            "exactly one",
        ),
        ({"guided_choice": []}, "guided_choice", "non-empty"),
        (
            {"guided_regex": "a", "response_format": {"type": "json_object"}},
            "guided_regex",
            "one of them",
        ),
        ({"guided_regex": "a", "ignore_eos": True}, "ignore_eos", "ends"),
        ({"guided_regex": "a", "min_tokens": 3}, "min_tokens", "ends"),
        (
            {"structured_outputs": {"regex": "a", "whitespace_pattern": " "}},
            "structured_outputs.whitespace_pattern",
            "not supported",
        ),
    ],
)
def test_a_format_that_cannot_be_compiled_is_a_400_naming_why(adm, kw, param, words):
    with pytest.raises(AdmissionError) as ei:
        adm.admit(chat([USER], **kw), True)
    e = ei.value
    assert e.status == 400 and e.param == param and words in e.message, e


def _lark_chain(n: int) -> str:
    return "\n".join(f'r{i}: "a" r{i + 1}' for i in range(n)) + f'\nr{n}: "b"\nstart: r0'


def _ref_chain(n: int) -> dict:
    defs = {
        f"d{i}": {"type": "object", "properties": {"a": {"$ref": f"#/$defs/d{i + 1}"}}}
        for i in range(n)
    }
    defs[f"d{n}"] = {"type": "integer"}
    return {"$ref": "#/$defs/d0", "$defs": defs}


@pytest.mark.parametrize(
    "kw",
    [
        {"structured_outputs": {"grammar": _lark_chain(3_000)}},  # 58 KB
        {"guided_json": _ref_chain(1_000)},  # 94 KB
    ],
)
def test_deep_grammars_do_not_crash_the_router(adm, kw):
    """llguidance recurses over a grammar with no depth bound: on an 8 MiB thread stack
    these two killed the router process (SIGSEGV; a cold review found it, and this test
    crashed pytest before the fix). Now they are compiled on a 64 MiB stack, within a
    64 KiB bound on the grammar, and get an answer: admitted, or a 400."""
    try:
        g = grammar(adm, **kw)
    except AdmissionError as e:
        assert e.status == 400
    else:
        assert g is not None


def test_a_format_that_allows_nothing_or_is_too_long_is_a_400(adm):
    """A regex that matches nothing allows no token at all: a 400 at admission, not a
    failure after the request was admitted; a format over 64 KiB compiled, a 400."""
    with pytest.raises(AdmissionError) as ei:
        grammar(adm, guided_regex="[^\\x00-\\x{10FFFF}]")
    assert ei.value.param == "guided_regex"
    with pytest.raises(AdmissionError) as ei:
        grammar(adm, guided_choice=["x" * 40_000, "y" * 40_000])
    assert "at most 65536" in ei.value.message


def test_validation_is_cached_and_bounded(adm, monkeypatch):
    monkeypatch.setattr("cluster.structured.VALIDATED_CACHE", 3)
    for i in range(5):
        grammar(adm, guided_regex=f"b{i}")
    assert len(adm.grammars._seen) == 3


# ---- tools ------------------------------------------------------------------------


def test_tools_reach_a_template_that_does_not_render_them(adm):
    ids = adm.admit(chat([USER], tools=[WEATHER]), True).choices[0].prompt_ids
    text = adm.tokenizer.decode(ids)
    assert (
        "get_weather" in text
        and "<tool_call>" in text
        and text.index("<tools>") < text.index("hello")
    )
    # "none": not shown, nothing enforced
    plain = adm.admit(chat([USER], tools=[WEATHER], tool_choice="none"), True).choices[0]
    assert "get_weather" not in adm.tokenizer.decode(plain.prompt_ids)
    assert plain.params.grammar is None


def test_tool_history_is_rendered_in_the_parsers_format(adm):
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
    }
    messages = [
        USER,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    text = adm.tokenizer.decode(adm.admit(chat(messages, tools=[TIME]), True).choices[0].prompt_ids)
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in text
    )
    assert "<tool_response>\nsunny\n</tool_response>" in text


def test_required_and_named_calls_are_enforced_by_a_grammar(adm):
    named = {"type": "function", "function": {"name": "get_weather"}}
    g = grammar(adm, tools=[WEATHER, TIME], tool_choice=named)
    assert accepts(g, adm, '{"city": "Oslo"}') and not accepts(g, adm, '{"town": "Oslo"}')
    g = grammar(adm, tools=[WEATHER, TIME], tool_choice="required")
    both = (
        '[{"name": "get_weather", "arguments": {"city": "Oslo"}}, '
        '{"name": "get_time", "arguments": {}}]'
    )
    assert accepts(g, adm, both) and not accepts(g, adm, "[]")
    g = grammar(adm, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
    assert not accepts(g, adm, both)
    assert accepts(g, adm, '[{"name": "get_time", "arguments": {}}]')


@pytest.mark.parametrize(
    "kw,param",
    [
        ({"tool_choice": "required"}, "tool_choice"),  # no tools
        ({"tools": [{"type": "web_search"}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": "f"}}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": ["required"]}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "required", "guided_regex": "a"}, "tool_choice"),
    ],
)
def test_bad_tools_are_400(adm, kw, param):
    with pytest.raises(AdmissionError) as ei:
        adm.admit(chat([USER], **kw), True)
    assert ei.value.status == 400 and ei.value.param == param, ei.value


def plan(mode="auto", parser="hermes", name=None):
    return tools.ToolPlan(mode, [WEATHER, TIME], parser, name=name)


@pytest.mark.parametrize(
    "p,text,content,calls",
    [
        (plan(), "It is sunny.", "It is sunny.", None),
        (
            plan(),
            "Let me look.\n<tool_call>\n"
            '{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
            "Let me look.",
            [("get_weather", {"city": "Oslo"})],
        ),
        (  # SmolLM2's way: a list in one tag; an unclosed last tag still parses
            plan(),
            '<tool_call>[{"name": "get_time", "arguments": {}}, '
            '{"name": "get_weather", "arguments": {"city": "Rome"}}]',
            None,
            [("get_time", {}), ("get_weather", {"city": "Rome"})],
        ),
        (plan(), '<tool_call>{"name": "nope", "arguments": {}}</tool_call>', None, None),
        (plan(), "<tool_call>{broken", None, None),
        (
            plan(parser="llama3_json"),
            '{"name": "get_weather", "parameters": {"city": "Oslo"}}',
            None,
            [("get_weather", {"city": "Oslo"})],
        ),
        (plan(parser="llama3_json"), "no call here", "no call here", None),
        (plan("required"), '[{"name": "get_time", "arguments": {}}]', None, [("get_time", {})]),
        (
            plan("named", name="get_weather"),
            '{"city": "Oslo"}',
            None,
            [("get_weather", {"city": "Oslo"})],
        ),
    ],
)
def test_answers_read_back_as_calls_whole_and_streamed(p, text, content, calls):
    got_content, got_calls = tools.parse(text, p)
    if calls is None:
        assert got_calls is None and got_content == text
    else:
        assert got_content == content
        assert [
            (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got_calls
        ] == calls
        assert all(c["id"].startswith("call_") and c["type"] == "function" for c in got_calls)
    # Streamed a few characters at a time: the deltas add up to the same answer.
    stream, sent, deltas = tools.ToolStream(p), "", []
    for k in range(0, len(text), 3):
        piece, d = stream.feed(text[k : k + 3])
        sent, deltas = sent + piece, deltas + d
    piece, d = stream.finish()
    sent, deltas = sent + piece, deltas + d
    merged: dict[int, dict] = {}
    for d in deltas:
        m = merged.setdefault(d["index"], {"name": "", "arguments": ""})
        m["name"] += d.get("function", {}).get("name", "")
        m["arguments"] += d["function"].get("arguments", "")
        assert ("id" in d) == (d is next(x for x in deltas if x["index"] == d["index"]))
    if calls is None:
        assert sent == text and not merged
    else:
        assert sent.strip() == (content or "")
        assert [(m["name"], json.loads(m["arguments"])) for m in merged.values()] == calls
    reason = tools.finish_reason(p, "stop", stream.calls)
    assert reason == ("tool_calls" if calls and p.mode != "named" else "stop")
