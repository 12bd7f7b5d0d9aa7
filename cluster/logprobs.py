"""Logprobs in OpenAI's and vLLM's shapes: a chat choice's `logprobs.content`, a
completion choice's `logprobs` (tokens, token_logprobs, top_logprobs, text_offset),
and vLLM's `prompt_logprobs`. The values are the workers' (wire.api.TokenLogprobs);
each token shows as its id decoded alone, as vLLM shows it."""

from __future__ import annotations

from wire.api import TokenLogprobs

# (token id, its logprobs); None for a prompt's first token, which has none.
Piece = tuple[int, TokenLogprobs | None]


def _value(lp: float) -> float:
    return max(lp, -9999.0)  # OpenAI's stand-in for -inf (JSON has no infinity)


class LogprobFormat:
    """Token strings for one request's logprobs, each id decoded once per router
    (`as_ids`: vLLM's return_tokens_as_token_ids, "token_id:<id>" instead)."""

    def __init__(self, tokenizer, cache: dict[int, str] | None = None, as_ids: bool = False):
        self.tokenizer = tokenizer
        self._text = {} if cache is None else cache  # the router's: at most the vocabulary
        self.as_ids = as_ids

    def for_request(self, as_ids: bool) -> LogprobFormat:
        return LogprobFormat(self.tokenizer, self._text, as_ids) if as_ids else self

    def text(self, tid: int) -> str:
        if self.as_ids:
            return f"token_id:{tid}"
        s = self._text.get(tid)
        if s is None:
            s = self._text[tid] = self.tokenizer.decode([tid], skip_special_tokens=False)
        return s

    def _entry(self, tid: int, lp: float) -> dict:
        t = self.text(tid)
        return {"token": t, "logprob": _value(lp), "bytes": list(t.encode("utf-8"))}

    def chat(self, pieces: list[Piece], k: int) -> dict:
        """A chat choice's (or chunk's) `logprobs`: each token's own, and its top k."""
        content = []
        for tid, (lp, _, ids, lps) in pieces:
            e = self._entry(tid, lp)
            e["top_logprobs"] = [self._entry(i, v) for i, v in zip(ids[:k], lps[:k])]
            content.append(e)
        return {"content": content}

    def completion(self, pieces: list[Piece], k: int, offset: int = 0) -> dict:
        """A completion choice's (or chunk's) `logprobs`; `offset`: the text's length
        before these tokens. Each token's top_logprobs holds it and the top k."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": []}
        offsets = []
        for tid, entry in pieces:
            t = self.text(tid)
            out["tokens"].append(t)
            offsets.append(offset)
            offset += len(t)
            if entry is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            lp, _, ids, lps = entry
            out["token_logprobs"].append(_value(lp))
            top = {t: _value(lp)}
            for i, v in zip(ids[:k], lps[:k]):
                top.setdefault(self.text(i), _value(v))
            out["top_logprobs"].append(top)
        out["text_offset"] = offsets
        return out

    def prompt(self, prompt_ids: list[int], entries: list[TokenLogprobs], k: int) -> list:
        """vLLM's `prompt_logprobs`: None for the first token, then per token a map of
        id (a string) -> {logprob, rank, decoded_token}: the token's own and the top k."""
        out: list = [None]
        for tid, (lp, rank, ids, lps) in zip(prompt_ids[1:], entries, strict=True):
            step = {str(tid): self._vllm(tid, lp, rank)}
            for r, (i, v) in enumerate(zip(ids[:k], lps[:k]), start=1):
                step.setdefault(str(i), self._vllm(i, v, r))
            out.append(step)
        return out

    def _vllm(self, tid: int, lp: float, rank: int) -> dict:
        return {"logprob": _value(lp), "rank": rank, "decoded_token": self.text(tid)}
