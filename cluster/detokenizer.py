"""Incremental detokenization and stop strings for streamed output.

`IncrementalDetokenizer` turns token ids into text as they arrive without ever
emitting half a character: it decodes only a short window (the prefix/read
offset technique of vLLM's `detokenize_incrementally`) and holds text back while
the window's decoded tail is U+FFFD (an incomplete UTF-8 sequence in byte-level
vocabularies). `StopChecker` cuts the text at the first stop string and withholds
any tail that could still become one, so text is never streamed and then
retracted.
"""

from __future__ import annotations

# Tokens of prompt context decoded before the first output token, so the first
# token's leading space / merged bytes come out as they would in the full text.
_CONTEXT = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Token ids in, new text out.

    Invariant: ``"".join(push(...) for each batch) + flush()`` equals the decode of
    the whole output (given the same prompt context), and no piece returned by
    `push` ends in U+FFFD.
    """

    def __init__(
        self, tokenizer, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True
    ):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # Window of ids: [prefix, read) is already emitted context; [read, end) is
        # pending. Only the last few prompt ids are kept as context.
        self.ids: list[int] = list(prompt_ids[-(_CONTEXT + 2) :]) if prompt_ids else []
        self.read = len(self.ids)
        self.prefix = max(self.read - _CONTEXT, 0)
        self._prefix_text = self._decode(self.prefix, self.read)

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(
            self.ids[start:end],
            skip_special_tokens=self.skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    def push(self, token_ids: list[int]) -> str:
        """Append `token_ids`; return the text they complete (possibly "")."""
        out = []
        for t in token_ids:
            self.ids.append(t)
            new_text = self._decode(self.prefix)
            if len(new_text) > len(self._prefix_text) and not new_text.endswith(_REPLACEMENT):
                out.append(new_text[len(self._prefix_text) :])
                self.prefix, self.read = self.read, len(self.ids)
                self._prefix_text = self._decode(self.prefix, self.read)
                self._trim()
        return "".join(out)

    def flush(self) -> str:
        """Whatever is held back (e.g. a dangling incomplete character) at the end."""
        new_text = self._decode(self.prefix)
        if len(new_text) <= len(self._prefix_text):
            return ""
        out = new_text[len(self._prefix_text) :]
        self.prefix, self.read = self.read, len(self.ids)
        self._prefix_text = self._decode(self.prefix, self.read)
        return out

    def _trim(self) -> None:
        # Drop ids before the window so memory stays bounded for long outputs.
        if self.prefix > 64:
            del self.ids[: self.prefix]
            self.read -= self.prefix
            self.prefix = 0


def find_stop(text: str, stop: list[str]) -> tuple[int, str] | None:
    """The earliest occurrence of any stop string in `text`: (index, stop string)."""
    best: tuple[int, str] | None = None
    for s in stop:
        i = text.find(s)
        if i >= 0 and (best is None or i < best[0] or (i == best[0] and len(s) > len(best[1]))):
            best = (i, s)
    return best


def _partial_len(text: str, stop: list[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    n = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), n, -1):
            if text.endswith(s[:k]):
                n = k
                break
    return n


class StopChecker:
    """Applies stop strings to streamed text.

    ``push(text, final)`` returns ``(text safe to emit now, stopped)``. Text that
    might be the start of a stop string is withheld until it is known not to be
    (or until `final`). Once stopped, the output is cut before the stop string
    (after it with `include_stop_str_in_output`) and later pushes return ("", True).
    """

    def __init__(self, stop: list[str] | None, include_stop_str_in_output: bool = False):
        self.stop = [s for s in (stop or []) if s]
        self.include = include_stop_str_in_output
        self.buf = ""
        self.stopped = False

    def push(self, text: str, final: bool = False) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stop:
            return text, False
        # Everything already emitted was checked, and any tail that could start a
        # stop string was kept in buf, so a stop string can only occur within buf.
        buf = self.buf + text
        hit = find_stop(buf, self.stop)
        if hit is not None:
            i, s = hit
            self.stopped, self.buf = True, ""
            return buf[: i + len(s) if self.include else i], True
        keep = 0 if final else _partial_len(buf, self.stop)
        self.buf = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False
