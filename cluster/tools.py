"""Tool calls: OpenAI's `tools`, `tool_choice` and `parallel_tool_calls`.

* `"none"`: the model answers in text; the tools are not shown to it.
* `"required"` and a named function are enforced by structured output
  (cluster/structured.py), so they work on any model: a named call's text is its
  arguments (the function's `parameters` schema); a required call's text is a JSON list
  of `{"name", "arguments"}`, one item when `parallel_tool_calls` is false.
* `"auto"` (the default with tools): the model writes calls in its family's format
  (`model.tool_call_parser`), read back here; text that does not parse as calls is
  the answer's content.

Templates that do not render tools (SmolLM2's, the tiny model's) get them from the
router in the parser's format: a system preamble listing the tools, assistant calls
written as the model would, tool results in `<tool_response>` tags.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import msgspec

from cluster.policy import bad
from cluster.structured import json_grammar

MAX_TOOLS = 128
_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for a function's name
TAG, END = "<tool_call>", "</tool_call>"


class Function(msgspec.Struct, kw_only=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(msgspec.Struct, kw_only=True):
    type: str
    function: Function


class ToolPlan(msgspec.Struct, frozen=True):
    """What a request's tools ask of its answer."""

    mode: str  # "none" | "auto" | "required" | "named"
    tools: list[dict]  # as OpenAI and Hugging Face templates take them
    parser: str  # model.tool_call_parser
    name: str | None = None  # mode "named": the function
    parallel: bool = True


def plan(req, parser: str) -> ToolPlan | None:
    """The request's tool plan (None: no tools); a 400 for tools or a choice that are
    not OpenAI's shape, or a named function that is not among the tools."""
    tc = req.tool_choice
    if not req.tools:
        if tc not in (None, "none", "auto"):
            raise bad("tool_choice", "a tool choice needs 'tools'")
        return None
    if len(req.tools) > MAX_TOOLS:
        raise bad("tools", f"{len(req.tools)} tools; at most {MAX_TOOLS}")
    try:
        tools = msgspec.convert(req.tools, list[Tool])
    except msgspec.ValidationError as e:
        raise bad("tools", f"each is {{'type': 'function', 'function': {{'name': ...}}}}: {e}")
    names = []
    for t in tools:
        if t.type != "function":
            raise bad("tools", f"type {t.type!r}; only 'function' tools")
        if not _NAME.match(t.function.name):
            raise bad("tools", f"function name {t.function.name[:70]!r}: a-z, A-Z, 0-9, _ and -")
        names.append(t.function.name)
    if len(set(names)) < len(names):
        raise bad("tools", "two functions have the same name")
    given = [msgspec.to_builtins(t) for t in tools]
    parallel = req.parallel_tool_calls is not False
    if tc is None or tc in ("auto", "none", "required"):
        return ToolPlan(tc or "auto", given, parser, parallel=parallel)
    fn = tc.get("function") if isinstance(tc, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(tc, dict) or tc.get("type") != "function" or not isinstance(name, str):
        raise bad(
            "tool_choice",
            '"none", "auto", "required" or {"type": "function", "function": {"name": ...}}',
        )
    if name not in names:
        raise bad("tool_choice", f"function {name[:70]!r} is not among the tools")
    return ToolPlan("named", given, parser, name=name, parallel=parallel)


def _parameters(tool: dict) -> dict:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def grammar(p: ToolPlan | None) -> str | None:
    """The structured output that enforces a required or named call."""
    if p is None or p.mode in ("none", "auto"):
        return None
    if p.mode == "named":
        tool = next(t for t in p.tools if t["function"]["name"] == p.name)
        return json_grammar(_parameters(tool), "tools")
    calls = {
        "anyOf": [
            {
                "type": "object",
                "properties": {
                    "name": {"const": t["function"]["name"]},
                    "arguments": _parameters(t),
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for t in p.tools
        ]
    }
    schema = {"type": "array", "items": calls, "minItems": 1}
    if not p.parallel:
        schema["maxItems"] = 1
    return json_grammar(schema, "tools")


# ---- the prompt ---------------------------------------------------------------


def _call_text(calls: list[dict], parser: str) -> str:
    """Calls (name, arguments as an object) as the model family writes them."""
    if parser == "llama3_json":
        return "; ".join(
            json.dumps({"name": c["name"], "parameters": c["arguments"]}) for c in calls
        )
    return "\n".join(f"{TAG}\n{json.dumps(c)}\n{END}" for c in calls)


def preamble(p: ToolPlan) -> str:
    """The system text that shows the tools to a model whose template does not."""
    listed = json.dumps([t["function"] for t in p.tools])
    example = _call_text([{"name": "<function-name>", "arguments": {"<arg>": "<value>"}}], p.parser)
    return (
        f"You may call these functions:\n<tools>\n{listed}\n</tools>\n"
        f"To call one, answer:\n{example}"
    )


def history_message(m, content: str, parser: str) -> dict:
    """An assistant message's calls, or a tool message's result, as the model reads
    them (for templates that do not render tools)."""
    if m.role == "tool":
        return {"role": "tool", "content": f"<tool_response>\n{content}\n</tool_response>"}
    calls = []
    for c in m.tool_calls or []:
        fn = c.get("function", {}) if isinstance(c, dict) else {}
        args = fn.get("arguments", "{}")
        try:
            args = json.loads(args) if isinstance(args, str) else args
        except ValueError:
            pass  # shown as the string it is
        calls.append({"name": fn.get("name", ""), "arguments": args})
    text = "\n".join(x for x in (content, _call_text(calls, parser)) if x)
    return {"role": "assistant", "content": text}


# ---- the answer -----------------------------------------------------------------


def _call(name: str, arguments: str) -> dict:
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def _as_calls(items: Any, names: set[str]) -> list[dict] | None:
    items = items if isinstance(items, list) else [items]
    calls = []
    for it in items:
        if not isinstance(it, dict) or it.get("name") not in names:
            return None
        args = it.get("arguments", it.get("parameters", {}))
        calls.append(_call(it["name"], args if isinstance(args, str) else json.dumps(args)))
    return calls or None


def _calls_in(parts: list[str], names: set[str]) -> list[dict] | None:
    """The calls the JSON texts `parts` hold, or None when one is not a call."""
    calls: list[dict] = []
    for part in parts:
        try:
            got = _as_calls(json.loads(part), names)
        except ValueError:
            return None
        if got is None:
            return None
        calls += got
    return calls


def _parse_auto(text: str, p: ToolPlan) -> tuple[str | None, list[dict] | None]:
    """(content, calls) of an "auto" answer; all text when it holds no call that parses."""
    names = {t["function"]["name"] for t in p.tools}
    if p.parser == "llama3_json":
        stripped = text.strip()
        calls = _calls_in(stripped.split(";"), names) if stripped.startswith("{") else None
        return (None, calls) if calls else (text, None)
    start = text.find(TAG)
    if start < 0:
        return text, None
    calls = _calls_in(re.findall(rf"{TAG}(.*?)(?:{END}|$)", text[start:], re.S), names)
    return ((text[:start].strip() or None), calls) if calls else (text, None)


def parse(text: str, p: ToolPlan) -> tuple[str | None, list[dict] | None]:
    """(content, tool calls) of a whole answer."""
    if p.mode == "none":
        return text, None
    if p.mode == "named":
        return None, [_call(p.name, text)]
    if p.mode == "required":
        try:
            calls = _as_calls(json.loads(text), {t["function"]["name"] for t in p.tools})
        except ValueError:
            calls = None
        return (None, calls) if calls else (text, None)
    return _parse_auto(text, p)


def finish_reason(p: ToolPlan, reason: str | None, calls: list[dict] | None) -> str | None:
    """OpenAI's: "tool_calls" when the model chose to call; a forced (named) call ends
    with "stop"; a cut one keeps "length"."""
    if calls and reason == "stop" and p.mode != "named":
        return "tool_calls"
    return reason


class ToolStream:
    """One streamed choice's text turned into content and tool-call deltas. A named
    call streams its arguments as they come; a required or "auto" call is sent whole
    when the choice ends (its text is held back from where a call may begin)."""

    def __init__(self, p: ToolPlan):
        self.p = p
        self.held = ""
        self.calls: list[dict] | None = None
        self._named_open = False

    def feed(self, piece: str) -> tuple[str, list[dict]]:
        """(content to send now, tool-call deltas to send now) for a new piece of text."""
        p = self.p
        if p.mode == "none":
            return piece, []
        if p.mode == "named":
            if not self._named_open:
                self._named_open = True
                self.calls = [_call(p.name, "")]
                head = {"index": 0, **self.calls[0]}
                head["function"] = {"name": p.name, "arguments": piece}
                return "", [head]
            return "", [{"index": 0, "function": {"arguments": piece}}] if piece else []
        if p.mode == "required":
            self.held += piece
            return "", []
        self.held += piece
        if p.parser == "llama3_json":
            if self.held.lstrip().startswith("{") or not self.held.strip():
                return "", []
            out, self.held = self.held, ""
            return out, []
        start = self.held.find(TAG)
        if start >= 0:
            out, self.held = self.held[:start], self.held[start:]
            return out, []
        # Hold back a tail that may be the start of the tag.
        keep = next(
            (
                n
                for n in range(min(len(TAG) - 1, len(self.held)), 0, -1)
                if TAG.startswith(self.held[-n:])
            ),
            0,
        )
        out, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        return out, []

    def finish(self) -> tuple[str, list[dict]]:
        """What is left to send when the choice ends: held text, or the calls."""
        p = self.p
        if p.mode in ("none", "named"):
            return "", []
        held, self.held = self.held, ""
        _, calls = parse(held, p)  # the content before a call has been sent already
        if not calls:
            return held, []
        self.calls = calls
        return "", [{"index": k, **c} for k, c in enumerate(calls)]
