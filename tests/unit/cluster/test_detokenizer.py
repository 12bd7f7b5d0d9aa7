"""Incremental detokenization never emits half a character; stop strings are cut
exactly and never streamed then retracted."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from cluster.detokenizer import IncrementalDetokenizer, StopChecker, find_stop

TEXT = "héllo wörld ✓ 日本"


@pytest.fixture(scope="module")
def tok():
    """Byte-level BPE with one token per byte and no merges: every multi-byte
    character spans several tokens. Built inline, no download."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["<eos>"] = len(vocab)
    t = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>")
    assert len(fast.encode(TEXT, add_special_tokens=False)) == len(TEXT.encode())
    return fast


def stream(tok, ids, prompt_ids=None, step=1, skip=True):
    d = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens=skip)
    pieces = [d.push(ids[i : i + step]) for i in range(0, len(ids), step)]
    return pieces, d.flush()


@pytest.mark.parametrize("step", [1, 2, 3])
@pytest.mark.parametrize("with_prompt", [False, True])
def test_streaming_equals_full_decode(tok, step, with_prompt):
    ids = tok.encode(TEXT, add_special_tokens=False)
    prompt = tok.encode("prompt: ", add_special_tokens=False) if with_prompt else None
    pieces, tail = stream(tok, ids, prompt, step)
    assert "".join(pieces) + tail == tok.decode(ids) == TEXT
    assert tail == ""
    assert all("\ufffd" not in p for p in pieces)
    # Multi-byte characters are held back until complete, so some pushes are empty.
    if step == 1:
        assert "" in pieces


def test_special_tokens_skipped_or_kept(tok):
    ids = tok.encode("ab", add_special_tokens=False) + [tok.eos_token_id]
    assert "".join(stream(tok, ids)[0]) == "ab"
    assert "".join(stream(tok, ids, skip=False)[0]) == "ab<eos>"


def test_dangling_partial_character_comes_out_on_flush(tok):
    ids = tok.encode("a✓", add_special_tokens=False)[:-1]  # cut inside the ✓
    pieces, tail = stream(tok, ids)
    assert "".join(pieces) == "a"
    assert tail and set(tail) == {"\ufffd"}


def test_long_output_window_stays_small(tok):
    text = "日本語のテキスト " * 40
    ids = tok.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(tok, None)
    out = "".join(d.push([t]) for t in ids) + d.flush()
    assert out == text
    assert len(d.ids) < 80  # decoded window is trimmed, not the whole sequence


def test_find_stop():
    assert find_stop("abcSTOPdef", ["STOP", "de"]) == (3, "STOP")
    assert find_stop("abc", ["x"]) is None
    assert find_stop("xab", ["ab", "a"]) == (1, "ab")


def run_stop(pieces, stop, include=False):
    sc = StopChecker(stop, include)
    out, stopped = [], False
    for i, p in enumerate(pieces):
        text, stopped = sc.push(p, final=i == len(pieces) - 1)
        out.append(text)
        if stopped:
            break
    return out, stopped


def test_stop_across_token_boundaries(tok):
    ids = tok.encode("hello END world", add_special_tokens=False)
    d = IncrementalDetokenizer(tok, None)
    pieces = [d.push([t]) for t in ids]
    out, stopped = run_stop(pieces, ["END"])
    assert stopped and "".join(out) == "hello "
    # No emitted piece ever contains part of the stop string.
    assert all("E" not in p and "N" not in p for p in out)
    out, stopped = run_stop(pieces, ["END"], include=True)
    assert stopped and "".join(out) == "hello END"


def test_partial_stop_prefix_is_withheld_then_released():
    sc = StopChecker(["</s>"])
    assert sc.push("a <") == ("a ", False)
    assert sc.push("/") == ("", False)
    assert sc.push("x") == ("</x", False)  # not a stop after all: released
    assert sc.push("<", final=True) == ("<", False)  # end of output: release all


def test_stop_inside_one_piece_and_after_stop():
    sc = StopChecker(["\n\n", "###"])
    assert sc.push("line\n\nmore") == ("line", True)
    assert sc.push("anything") == ("", True)


def test_no_stop_strings_pass_through():
    sc = StopChecker([])
    assert sc.push("abc") == ("abc", False)
    assert StopChecker(None).push("x", final=True) == ("x", False)
