"""Admission: from an HTTP body to (request, prompt token ids, SamplingParams), or a
4xx in OpenAI's shape with nothing allocated.

Reading the body (its size and time bounds), parsing (cluster/protocol.py), the chat
template, tokenizing, and every check that needs the model: token ids within its
vocabulary, the prompt within its context. `admit` runs on the router's admission
threads, never on its event loop.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import jinja2
import msgspec
from transformers import PreTrainedTokenizerBase

from cluster import structured, tools
from cluster.config import Config
from cluster.policy import (
    MAX_LOGPROBS,
    echo_only,
    logprobs_asked,
    message_text,
    requested_max_tokens,
    runs_per_prompt,
)
from cluster.protocol import (
    AdmissionError,
    ChatCompletionRequest,
    CompletionRequest,
    parse_chat,
    parse_completion,
    parse_detokenize,
    parse_tokenize,
)
from wire.sampling_params import SamplingParams

# What a chat template gets from Hugging Face itself, never template variables from a
# request: apply_chat_template's own parameters, what it passes to the template (the
# messages, raise_exception, strftime_now) and the tokenizer's special tokens.
_TEMPLATE_PARAMETERS = (
    frozenset(inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters)
    - {"kwargs", "self"}
) | {
    "messages",
    "raise_exception",
    "strftime_now",
    *PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES,
}

# Below this a temperature is treated as greedy (as vLLM does): dividing logits by
# ~0 overflows.
_GREEDY_EPS = 1e-5


def model_vocab_size(model_dir: str, default: int) -> int:
    """The model's vocabulary size (its config.json)."""
    try:
        return int(json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"])
    except (OSError, KeyError, ValueError, TypeError):
        return default


def model_eos_ids(model_dir: str) -> list[int]:
    """The ids that end a generation (generation_config.json's eos_token_id)."""
    try:
        eos = json.loads((Path(model_dir) / "generation_config.json").read_text())["eos_token_id"]
    except (OSError, KeyError, ValueError, TypeError):
        return []
    return [int(t) for t in (eos if isinstance(eos, list) else [eos])]


def context_length_exceeded(max_model_len: int, what: str, param: str) -> AdmissionError:
    """The one error for a request that does not fit the model's context: OpenAI's
    sentence, then `what` ("but the prompt has ...", or a new "However, ..." sentence)."""
    head = f"This model's maximum context length is {max_model_len} tokens"
    text = f"{head}. {what}." if what[:1].isupper() else f"{head}, {what}."
    return AdmissionError(text, param, "context_length_exceeded")


def to_sampling_params(
    req: ChatCompletionRequest | CompletionRequest,
    *,
    prompt_len: int,
    max_model_len: int,
    default_max_tokens: int,
    strict: bool,
    vocab_size: int | None = None,
    bad_words_ids: list[list[int]] | None = None,
    grammar: str | None = None,
) -> SamplingParams:
    """Resolve defaults and the context window into the workers' SamplingParams.

    A prompt that leaves no room is a 400. An explicit max_tokens larger than the
    room is clamped (or a 400 when `strict`); the default max_tokens is always
    clamped, since the client did not ask for it. Token ids outside [0, vocab_size)
    are a 400 here, never an index error in a worker."""
    chat = isinstance(req, ChatCompletionRequest)
    where = "messages" if chat else "prompt"
    if vocab_size is not None:
        for name, ids in (
            ("logit_bias", [int(k) for k in req.logit_bias or {}]),
            ("allowed_token_ids", req.allowed_token_ids or []),
        ):
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                raise AdmissionError(
                    f"Invalid '{name}': ids {bad[:5]} are outside the vocabulary [0, {vocab_size})",
                    name,
                    "invalid_value",
                )
    if vocab_size is not None and req.stop_token_ids:
        bad = [t for t in req.stop_token_ids if t >= vocab_size]
        if bad:
            raise AdmissionError(
                f"Invalid 'stop_token_ids': ids {bad[:5]} are outside the vocabulary "
                f"[0, {vocab_size})",
                "stop_token_ids",
                "invalid_value",
            )
        if (req.min_tokens or 0) > 0 and len(set(req.stop_token_ids)) >= vocab_size:
            raise AdmissionError(
                "Invalid 'stop_token_ids': with min_tokens they ban every token of the vocabulary",
                "stop_token_ids",
                "invalid_value",
            )
    room = max_model_len - prompt_len
    if room <= 0:
        raise context_length_exceeded(
            max_model_len,
            f"but the {where} has {prompt_len} tokens, leaving no room for the completion. "
            "Please shorten it",
            where,
        )
    asked = requested_max_tokens(req)
    max_tokens = asked or default_max_tokens
    if echo_only(req):  # the prompt scored: one token computed, none returned
        asked = max_tokens = 1
    if max_tokens > room:
        if strict and asked is not None:
            raise context_length_exceeded(
                max_model_len,
                f"However, you requested {prompt_len + max_tokens} tokens ({prompt_len} in "
                f"the {where}, {max_tokens} in the completion). Please reduce the length of "
                f"the {where} or the completion",
                "max_completion_tokens" if chat and req.max_completion_tokens else "max_tokens",
            )
        max_tokens = room
    logprobs, prompt_logprobs = logprobs_asked(req)
    temperature = 1.0 if req.temperature is None else float(req.temperature)
    if temperature < _GREEDY_EPS:
        temperature = 0.0
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=1.0 if req.top_p is None else float(req.top_p),
        top_k=-1 if req.top_k in (None, 0) else req.top_k,
        seed=req.seed,
        stop=[req.stop] if isinstance(req.stop, str) else list(req.stop or []),
        stop_token_ids=list(req.stop_token_ids or []),
        ignore_eos=bool(req.ignore_eos),
        min_tokens=min(req.min_tokens or 0, max_tokens),
        skip_special_tokens=req.skip_special_tokens is not False,
        include_stop_str_in_output=bool(req.include_stop_str_in_output),
        cache_salt=req.cache_salt,
        presence_penalty=float(req.presence_penalty or 0.0),
        frequency_penalty=float(req.frequency_penalty or 0.0),
        repetition_penalty=float(req.repetition_penalty or 1.0),
        min_p=float(req.min_p or 0.0),
        logit_bias={int(k): float(v) for k, v in (req.logit_bias or {}).items()},
        allowed_token_ids=sorted(set(req.allowed_token_ids or [])),
        bad_words_ids=list(bad_words_ids or []),
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        grammar=grammar,
    )


class Choice(msgspec.Struct, frozen=True):
    """One choice of an answer: a chat request's one, or one prompt of a completions
    batch; each runs its own lifecycle."""

    prompt_ids: list[int]
    params: SamplingParams
    echo: str = ""  # the prompt's text, sent before the completion (completions' `echo`)
    prompt_index: int = 0  # which prompt of the request (n and best_of run each n times)


class Admitted(msgspec.Struct, frozen=True):
    """A request ready for its lifecycles."""

    request: ChatCompletionRequest | CompletionRequest
    choices: list[Choice]
    ignored: tuple[str, ...] = ()  # unknown fields of the body, ignored
    tools: tools.ToolPlan | None = None  # chat: what its tools ask of the answer


def check_model(name: str | None, served: str) -> None:
    """A request naming a model this cluster does not serve: 404, as OpenAI's API says."""
    if name is not None and name != served:
        raise AdmissionError(
            f"The model `{name}` does not exist.", "model", "model_not_found", status=404
        )


class Admission:
    """One router replica's admission: its config, tokenizer and model limits."""

    def __init__(self, cfg: Config, tokenizer, model_dir: str) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        # Token ids valid for both the tokenizer and the model's embedding: the one
        # bound for prompt ids and stop_token_ids.
        self.vocab_size = min(len(tokenizer), model_vocab_size(model_dir, len(tokenizer)))
        # Longest text one token can stand for (byte-level BPE: its string's length).
        self.max_token_chars = max(len(t) for t in tokenizer.get_vocab())
        self.grammars = structured.Validator(
            model_dir, model_vocab_size(model_dir, len(tokenizer)), model_eos_ids(model_dir)
        )
        # A template that renders tools itself gets them as Hugging Face passes them;
        # any other gets them from cluster/tools.py in the model family's format.
        self.template_renders_tools = "tools" in (tokenizer.chat_template or "")

    async def read_body(self, request) -> bytes:
        """The request body, refused (413) as soon as it passes router.max_body_bytes:
        by its Content-Length before reading, or while it is read."""
        limit = self.cfg.router.max_body_bytes
        too_big = AdmissionError(
            f"request body is larger than {limit} bytes (router.max_body_bytes)",
            code="request_too_large",
            status=413,
        )
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    def admit(self, body: bytes, chat: bool) -> Admitted:  # admission thread
        """Parse, check and tokenize one request."""
        r = self.cfg.router
        if chat:
            parsed = parse_chat(body, r.max_messages, strict=r.strict_fields)
        else:
            parsed = parse_completion(body, strict=r.strict_fields)
        req = parsed.request
        check_model(req.model, self.cfg.served_model_name)
        bad_words = self.bad_words_ids(req.bad_words or [])
        plan = tools.plan(req, self.cfg.model.tool_call_parser) if chat else None
        asked = structured.grammar_of(req, tools.grammar(plan))
        if asked is not None:
            self.grammars.check(asked[1], asked[0])
        choices = []
        _, runs = runs_per_prompt(req)
        for i, prompt in enumerate([None] if chat else req.prompt):
            prompt_ids = self.tokenize_chat(req, plan) if chat else self.tokenize_prompt(prompt)
            params = to_sampling_params(
                req,
                prompt_len=len(prompt_ids),
                max_model_len=self.cfg.model.max_model_len,
                default_max_tokens=r.default_max_tokens,
                strict=r.strict_max_tokens,
                vocab_size=self.vocab_size,
                bad_words_ids=bad_words,
                grammar=None if asked is None else asked[1],
            )
            echo = ""
            if not chat and req.echo:
                echo = prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt)
            if runs > (req.n or 1) and params.logprobs is None:  # best_of ranks by them
                params = msgspec.structs.replace(params, logprobs=0)
            for j in range(runs):
                # Run j samples its own stream: seed + j, as vLLM's parallel sampling.
                seed = None if params.seed is None else params.seed + j
                run = msgspec.structs.replace(params, seed=seed) if j else params
                choices.append(Choice(prompt_ids, run, echo, i))
        self._check_prompt_logprobs(choices, req)
        return Admitted(req, choices, parsed.ignored, plan)

    def _check_prompt_logprobs(self, choices: list[Choice], req) -> None:
        """Prompt logprobs cost (prompt tokens x (k + 1)) entries, on the worker, on the
        wire and in the router's answer: at most a full context's worth at the top k
        allowed per request (a 64-prompt batch of long prompts would hold gigabytes)."""
        k = choices[0].params.prompt_logprobs
        if k is None:
            return
        cap = self.cfg.model.max_model_len * (MAX_LOGPROBS + 1)
        asked = sum(len(c.prompt_ids) for c in choices) * (k + 1)
        if asked > cap:
            param = "prompt_logprobs" if req.prompt_logprobs is not None else "echo"
            raise AdmissionError(
                f"Invalid '{param}': prompt logprobs for {asked // (k + 1)} prompt tokens in "
                f"all (with n and best_of) at {k} top logprobs each; at most "
                f"{cap // (k + 1)} at that count (model.max_model_len x {MAX_LOGPROBS + 1} "
                "entries)",
                param,
                "invalid_value",
            )

    def bad_words_ids(self, words: list[str]) -> list[list[int]]:
        """Each bad word's token ids, as vLLM makes them: the word as given and with a
        leading space (how it reads mid-text), without special tokens, each once."""
        out: list[list[int]] = []
        for word in words:
            for text in (word.lstrip(), " " + word.lstrip()):
                ids = self.tokenizer.encode(text, add_special_tokens=False)
                if ids and ids not in out:
                    out.append(ids)
        return out

    def _refuse_untokenizable(self, chars: int, chat: bool) -> None:
        """No token is longer than `max_token_chars` characters, so a text longer than
        max_model_len times that cannot fit: refused without tokenizing it (a huge
        prompt would hold a tokenizer thread for seconds)."""
        max_len = self.cfg.model.max_model_len
        if chars > max_len * self.max_token_chars:
            where = "messages" if chat else "prompt"
            raise context_length_exceeded(
                max_len,
                f"and the {where} ({chars} characters) is longer than that can hold. "
                "Please shorten it",
                where,
            )

    def tokenize_chat(self, req, plan: tools.ToolPlan | None = None) -> list[int]:
        """Chat messages (and the tools `plan` shows) through the model's chat template,
        as token ids."""
        messages, tool_kwargs = self._template_messages(req, plan)
        kwargs = dict(req.chat_template_kwargs or {})
        # Everything the template gets counts, not only the content.
        self._refuse_untokenizable(
            sum(len(m["role"]) + len(m["content"] or "") for m in messages)
            + len(msgspec.json.encode(kwargs))
            + len(msgspec.json.encode(tool_kwargs)),
            chat=True,
        )
        reserved = sorted(kwargs.keys() & _TEMPLATE_PARAMETERS)
        if reserved:
            raise AdmissionError(
                f"Invalid 'chat_template_kwargs': {reserved[0]!r} is set by the request "
                "itself, not a template variable",
                "chat_template_kwargs",
                "invalid_value",
            )
        add_prompt = req.add_generation_prompt
        if add_prompt is None:
            add_prompt = not req.continue_final_message
        try:
            ids = self.tokenizer.apply_chat_template(
                messages,
                add_generation_prompt=add_prompt,
                continue_final_message=bool(req.continue_final_message),
                tokenize=True,
                return_dict=False,
                **tool_kwargs,
                **kwargs,
            )
        except jinja2.TemplateSyntaxError:
            raise  # the model's template is broken: a server error
        except (TypeError, ValueError, RecursionError) as e:
            if not (kwargs or req.continue_final_message):
                raise  # the model's template fails on plain messages: a server error
            # The request's template variables or continue_final_message broke it.
            raise AdmissionError(
                f"The model's chat template could not render the request: "
                f"{type(e).__name__}: {str(e)[:200]}",
                "chat_template_kwargs" if kwargs else "continue_final_message",
                "invalid_value",
            ) from None
        except jinja2.TemplateError as e:  # it refused these messages (raise_exception)
            raise AdmissionError(
                f"The model's chat template refused the messages: {e}",
                "messages",
                "invalid_value",
            ) from None
        return list(ids)

    def _template_messages(self, req, plan: tools.ToolPlan | None) -> tuple[list[dict], dict]:
        """The messages as the template takes them, and the tools it is passed (when it
        renders them). vLLM's `developer` role is the system role to a template."""
        shown = plan is not None and plan.mode != "none"
        renders = self.template_renders_tools
        messages = []
        for m in req.messages:
            role, content = "system" if m.role == "developer" else m.role, message_text(m)
            if renders and (m.role == "tool" or m.tool_calls):
                msg = {"role": role, "content": content or None}
                if m.tool_calls:
                    msg["tool_calls"] = m.tool_calls
                if m.tool_call_id is not None:
                    msg["tool_call_id"] = m.tool_call_id
                messages.append(msg)
            elif m.role == "tool" or m.tool_calls:
                parser = self.cfg.model.tool_call_parser
                messages.append(tools.history_message(m, content, parser))
            else:
                messages.append({"role": role, "content": content})
        if not shown:
            return messages, {}
        if renders:
            return messages, {"tools": plan.tools}
        text = tools.preamble(plan)
        if messages and messages[0]["role"] == "system":
            messages[0] = {"role": "system", "content": f"{messages[0]['content']}\n\n{text}"}
        else:
            messages.insert(0, {"role": "system", "content": text})
        return messages, {}

    def tokenize_prompt(self, prompt: str | list[int], special_tokens: bool = True) -> list[int]:
        """One completions prompt: token ids as given (checked), or a string's ids."""
        if isinstance(prompt, list):
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise AdmissionError(
                    f"prompt token ids out of range [0, {self.vocab_size}): {bad[:5]}",
                    param="prompt",
                    code="invalid_token_id",
                )
            return list(prompt)
        self._refuse_untokenizable(len(prompt), chat=False)
        return self.tokenizer.encode(prompt, add_special_tokens=special_tokens)

    def tokenize_body(self, body: bytes) -> bytes:  # admission thread
        """vLLM's `POST /tokenize`: the ids a prompt (or chat messages, templated) is."""
        req = parse_tokenize(body, self.cfg.router.max_messages)
        check_model(req.model, self.cfg.served_model_name)
        if req.messages is not None:
            ids = self.tokenize_chat(req)
        else:
            ids = self.tokenize_prompt(req.prompt, req.add_special_tokens is not False)
        out = {"count": len(ids), "max_model_len": self.cfg.model.max_model_len, "tokens": ids}
        out["token_strs"] = (
            self.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        )
        return msgspec.json.encode(out)

    def detokenize_body(self, body: bytes) -> bytes:  # admission thread
        """vLLM's `POST /detokenize`: the text of token ids."""
        req = parse_detokenize(body)
        check_model(req.model, self.cfg.served_model_name)
        if len(req.tokens) > self.cfg.model.max_model_len:
            raise AdmissionError(
                f"Invalid 'tokens': {len(req.tokens)} ids; at most the model's context, "
                f"{self.cfg.model.max_model_len}",
                "tokens",
                "invalid_value",
            )
        bad = [t for t in req.tokens if t >= self.vocab_size]
        if bad:
            raise AdmissionError(
                f"token ids out of range [0, {self.vocab_size}): {bad[:5]}",
                "tokens",
                "invalid_token_id",
            )
        return msgspec.json.encode({"prompt": self.tokenizer.decode(req.tokens)})
