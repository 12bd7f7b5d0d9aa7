"""Per-request sampling: top-k, top-p, seeds, min_tokens, stop token ids, ignore_eos."""

from __future__ import annotations

import torch

from wire.sampling_params import SamplingParams
from workers.sampler import SampleError, sample
from workers.sequence import Sequence, finish_reason

EOS = (2,)


def draw(logits: torch.Tensor, seqs: list[Sequence]) -> list:
    """The tokens (or SampleErrors) `sample` draws for `seqs`."""
    return sample(logits, seqs, EOS)[0]


V = 50


def seq(output: list[int] | None = None, **params) -> Sequence:
    return Sequence("r", [5, 6, 7], SamplingParams(max_tokens=100, **params), output)


def logits(rows: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed))


def test_top_k_1_and_tiny_top_p_are_argmax():
    for s in range(20):
        x = logits(seed=s)
        best = int(x[0].argmax())
        assert draw(x.clone(), [seq(temperature=1.0, top_k=1, seed=s)]) == [best]
        assert draw(x.clone(), [seq(temperature=1.0, top_p=1e-6, seed=s)]) == [best]


def test_top_k_keeps_only_the_k_best():
    x = logits()
    top3 = set(torch.topk(x[0], 3).indices.tolist())
    got = {draw(x.clone(), [seq(temperature=5.0, top_k=3, seed=s)])[0] for s in range(200)}
    assert got <= top3 and len(got) > 1


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    x = torch.full((1, V), -30.0)
    x[0, 10], x[0, 11], x[0, 12] = 2.0, 1.0, 0.0  # probs ~0.67, 0.24, 0.09
    got = {draw(x.clone(), [seq(temperature=1.0, top_p=0.8, seed=s)])[0] for s in range(300)}
    assert got == {10, 11}


def test_seed_reproduces_and_differs_across_seeds():
    x = logits(4)

    def run(seed):
        seqs = [seq(temperature=1.0, seed=seed) for _ in range(4)]
        return [draw(x.clone(), seqs) for _ in range(10)]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_min_tokens_bans_eos_and_stop_ids_until_reached():
    x = torch.zeros(2, V)
    x[:, 2] = 10.0  # EOS is the best token
    x[:, 9] = 9.0  # then a stop token id
    x[:, 4] = 8.0
    early = [
        seq(temperature=0.0, min_tokens=3, stop_token_ids=[9]),
        seq([1, 1, 1], temperature=0.0, min_tokens=3, stop_token_ids=[9]),
    ]
    assert draw(x.clone(), early) == [4, 2]


def test_ignore_eos_keeps_eos_from_stopping_but_not_stop_ids():
    s = seq([1], temperature=0.0, ignore_eos=True, stop_token_ids=[9])
    assert finish_reason(s, 2, EOS, 2048) is None
    assert finish_reason(s, 9, EOS, 2048) == "stop"
    s = seq([1], temperature=0.0)
    assert finish_reason(s, 2, EOS, 2048) == "stop"
    s = seq([1], temperature=0.0, min_tokens=5)
    assert finish_reason(s, 2, EOS, 2048) is None


def test_max_tokens_and_context_window_end_a_sequence():
    s = Sequence("r", [5, 6, 7], SamplingParams(max_tokens=2), [1, 1])
    assert finish_reason(s, 1, EOS, 2048) == "length"
    s = Sequence("r", [5, 6, 7], SamplingParams(max_tokens=100), [1])
    assert finish_reason(s, 1, EOS, 4) == "length"


def test_a_poisoned_sequence_fails_alone_and_its_neighbours_sample():
    """An out-of-range stop id (checked before any indexing: a device assert on CUDA)
    and a min_tokens ban of the whole vocabulary fail their own rows only."""
    x = logits(rows=4)
    bad_id = seq(temperature=0.0, min_tokens=1, stop_token_ids=[99_999_999])
    everything = seq(temperature=0.8, seed=1, min_tokens=1, stop_token_ids=list(range(V)))
    everything_greedy = seq(
        temperature=0.0, min_tokens=1, ignore_eos=True, stop_token_ids=list(range(V))
    )
    out = draw(x.clone(), [bad_id, seq(temperature=0.0), everything, everything_greedy])
    assert isinstance(out[0], SampleError) and out[0].status == 400
    assert "outside the vocabulary" in str(out[0])
    assert out[1] == int(x[1].argmax())
    assert isinstance(out[2], SampleError) and isinstance(out[3], SampleError)
    assert "every token" in str(out[2])


def test_sampling_never_returns_nan_driven_tokens():
    x = torch.full((1, V), float("nan"))
    out = draw(x, [seq(temperature=0.7, seed=3)])
    assert isinstance(out[0], SampleError) and out[0].status == 500


# ---- logits processing against Hugging Face's processors, on the same logits -------


def _processed(s: Sequence, x: torch.Tensor) -> torch.Tensor:
    """The row `sample` takes its argmax of (greedy), after vLLM's processing."""
    from workers.sampler import _process_row

    row = x[0].clone()
    _process_row(row, s, V)
    return row


def _hf(processor, s: Sequence, x: torch.Tensor) -> torch.Tensor:
    return processor(torch.tensor([s.token_ids]), x.clone())[0]


def test_repetition_penalty_equals_hf_on_prompt_and_output_tokens():
    from transformers import RepetitionPenaltyLogitsProcessor

    for penalty in (0.7, 1.3, 2.0):
        s = seq([9, 9, 30], repetition_penalty=penalty)
        x = logits(seed=3)
        want = _hf(RepetitionPenaltyLogitsProcessor(penalty), s, x)
        torch.testing.assert_close(_processed(s, x), want)


def test_frequency_and_presence_penalties_count_output_tokens_only():
    """OpenAI's definition, as vLLM applies it: minus frequency x count and presence
    once, for tokens of the output; prompt tokens (5, 6, 7) are not penalized."""
    s = seq([9, 9, 30, 5], frequency_penalty=0.5, presence_penalty=1.25)
    x = logits(seed=4)
    want = x[0].clone()
    for tok, n in {9: 2, 30: 1, 5: 1}.items():
        want[tok] -= 0.5 * n + 1.25
    torch.testing.assert_close(_processed(s, x), want)


def test_logit_bias_allowed_ids_and_bad_words_equal_hfs_processors():
    from transformers import (
        NoBadWordsLogitsProcessor,
        SequenceBiasLogitsProcessor,
        SuppressTokensLogitsProcessor,
    )

    x = logits(seed=5)
    s = seq([9, 11], logit_bias={3: 5.0, 40: -100.0})
    want = _hf(SequenceBiasLogitsProcessor({(3,): 5.0, (40,): -100.0}), s, x)
    torch.testing.assert_close(_processed(s, x), want)
    allowed = [1, 4, 8]
    s = seq([9], allowed_token_ids=allowed)
    others = [t for t in range(V) if t not in allowed]
    want = _hf(SuppressTokensLogitsProcessor(others, device="cpu"), s, x)
    torch.testing.assert_close(_processed(s, x), want)
    # [12]: always banned; [9, 11, 13]: 13 banned after 9, 11; [20, 21]: not after 11.
    words = [[12], [9, 11, 13], [20, 21]]
    s = seq([9, 11], bad_words_ids=words)
    want = _hf(NoBadWordsLogitsProcessor(words, eos_token_id=2), s, x)
    torch.testing.assert_close(_processed(s, x), want)
    assert _processed(s, x)[13] == float("-inf") and _processed(s, x)[21] != float("-inf")


def test_min_p_equals_hfs_warper():
    from transformers import MinPLogitsWarper

    from workers.sampler import apply_min_p

    x = logits(seed=6) * 3
    for min_p in (0.05, 0.3):
        want = MinPLogitsWarper(min_p)(torch.tensor([[5]]), x.clone())[0]
        got = apply_min_p(x[0], min_p)
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        got_probs = {int(t) for t in torch.nonzero(~torch.isinf(got))}
        drawn = {
            draw(x.clone(), [seq(temperature=1.0, min_p=min_p, seed=k)])[0] for k in range(200)
        }
        assert drawn <= got_probs


def test_greedy_takes_the_argmax_after_processing_and_bad_ids_fail_alone():
    x = logits(seed=7)
    best = int(x[0].argmax())
    s = seq(temperature=0.0, logit_bias={best: -100.0})
    assert draw(x.clone(), [s])[0] != best
    bad = seq(temperature=0.0, allowed_token_ids=[V + 5])
    ok = seq(temperature=0.0)
    x2 = logits(2, seed=7)
    out = draw(x2.clone(), [bad, ok])
    assert isinstance(out[0], SampleError) and out[0].status == 400
    assert out[1] == int(x2[1].argmax())


def test_options_that_leave_nothing_to_sample_fail_that_sequence_with_a_400():
    """allowed_token_ids = [EOS] while min_tokens bans EOS, or a repetition penalty so
    small the logits overflow: a 400 for that sequence, greedy or sampled, never the
    argmax of a row of -inf (it returned the banned EOS) and never a 500."""
    for extra in ({"temperature": 0.0}, {"temperature": 0.9, "seed": 1}):
        bad = seq(allowed_token_ids=[EOS[0]], min_tokens=3, **extra)
        huge = seq([9], repetition_penalty=1e-300, **extra)
        out = draw(logits(3, seed=8), [bad, huge, seq(**extra)])
        assert isinstance(out[0], SampleError) and out[0].status == 400, out
        assert isinstance(out[1], SampleError) and out[1].status == 400, out
        assert isinstance(out[2], int)


def test_the_kept_counts_equal_a_fresh_count_as_the_output_grows():
    """Seen tokens and counts are kept per sequence and updated with each new token:
    the same logits as computing them afresh at every length."""
    from workers.sampler import _process_row

    s = seq([], repetition_penalty=1.4, frequency_penalty=0.7, presence_penalty=0.2)
    for tok in [9, 9, 30, 5, 9, 41]:
        s.token_ids.append(tok)
        x = logits(seed=tok)
        kept = x[0].clone()
        _process_row(kept, s, V)
        fresh = seq(
            s.token_ids[3:], repetition_penalty=1.4, frequency_penalty=0.7, presence_penalty=0.2
        )
        assert torch.equal(kept, _processed(fresh, x))
