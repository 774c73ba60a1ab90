"""Penalty and min_tokens tests: the in-place batched edits against a per-row, per-token
reference written out plainly here (vLLM / HF semantics)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from ember.engine.penalties import apply_penalties_, mask_min_tokens_, needs_penalties
from ember.engine.sampler import Sampler, SamplingRow
from ember.engine.sampling_params import SamplingParams


def row(params: SamplingParams, prompt: list[int], output: list[int],
        suppressed: list[int] | None = None) -> SamplingRow:
    return SamplingRow(params, prompt, output, None, suppressed or [])


def reference_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    out = logits.clone()
    for i, r in enumerate(rows):
        p = r.params
        for token in set(r.prompt_token_ids) | set(r.output_token_ids):
            value = out[i, token].item()
            out[i, token] = value / p.repetition_penalty if value > 0 else (
                value * p.repetition_penalty)
        for token, count in Counter(r.output_token_ids).items():
            out[i, token] -= p.frequency_penalty * count + p.presence_penalty
    return out


ROWS = [
    row(SamplingParams(repetition_penalty=1.3), [1, 2, 2, 5], [5, 7]),
    row(SamplingParams(repetition_penalty=0.7), [3], [3, 3, 9]),  # < 1 rewards repeats
    row(SamplingParams(frequency_penalty=0.5), [4, 4], [4, 6, 6, 6]),  # prompt ids not counted
    row(SamplingParams(presence_penalty=1.5), [8], [0, 0, 11, 11, 11]),
    row(SamplingParams(presence_penalty=-0.5, frequency_penalty=-0.25, repetition_penalty=1.1),
        [0, 1, 2], [2, 2, 3, 10, 10]),
    row(SamplingParams(), [1, 2, 3], [4, 5]),  # neutral: untouched
    row(SamplingParams(frequency_penalty=2.0), [1], []),  # nothing generated yet
]


def test_penalties_match_the_reference():
    torch.manual_seed(0)
    logits = torch.randn(len(ROWS), 12) * 3
    logits[0, 5] = 2.0  # positive and negative logits take the two branches
    logits[0, 1] = -2.0
    expected = reference_penalties(logits, ROWS)
    actual = logits.clone()
    apply_penalties_(actual, ROWS)
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(actual[5], logits[5]) and torch.equal(actual[6], logits[6])
    assert actual[2, 4] == logits[2, 4] - 0.5  # 4 is counted once, from the output only


def test_greedy_sampler_picks_argmax_of_penalised_logits():
    torch.manual_seed(1)
    logits = torch.randn(len(ROWS), 12) * 3
    greedy = [row(r.params.clone(temperature=0.0), r.prompt_token_ids, r.output_token_ids)
              for r in ROWS]
    out = Sampler()(logits, greedy)
    assert out.token_ids == reference_penalties(logits, greedy).argmax(dim=-1).tolist()


def test_penalties_flip_the_greedy_choice():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    params = SamplingParams(temperature=0.0, frequency_penalty=0.2)
    assert Sampler()(logits, [row(params, [], [])]).token_ids == [0]
    assert Sampler()(logits, [row(params, [], [0])]).token_ids == [1]
    rep = SamplingParams(temperature=0.0, repetition_penalty=1.2)
    assert Sampler()(logits, [row(rep, [0], [])]).token_ids == [1]  # prompt ids count too


def test_min_tokens_mask_only_before_min_tokens():
    logits = torch.zeros(3, 6)
    rows = [row(SamplingParams(min_tokens=2), [], [1], suppressed=[5, 2]),
            row(SamplingParams(min_tokens=2), [], [1, 1], suppressed=[5, 2]),
            row(SamplingParams(), [], [], suppressed=[5])]
    mask_min_tokens_(logits, rows)
    inf = float("inf")
    assert logits[0].tolist() == [0, 0, -inf, 0, 0, -inf]
    assert logits[1].tolist() == [0] * 6 and logits[2].tolist() == [0] * 6


def test_needs_penalties_and_out_of_range_ids():
    assert not needs_penalties(SamplingParams())
    assert needs_penalties(SamplingParams(presence_penalty=0.1))
    logits = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="out of range"):
        apply_penalties_(logits, [row(SamplingParams(repetition_penalty=2.0), [4], [])])


@pytest.mark.parametrize("penalty", [5e-324, 1e-30, 1e30, 1e308])
@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0, top_k=0),
                                      dict(temperature=0.8, top_k=5, top_p=0.9)])
def test_extreme_repetition_penalties_still_sample_a_valid_token(penalty, sampling):
    """Found by fuzzing the server: dividing by a denormal penalty overflowed to inf and the
    draw indexed past the vocabulary."""
    vocab = 64
    logits = torch.randn(3, vocab) * 5
    seen = list(range(vocab))  # every id penalised: an all-overflow row is the worst case
    rows = [row(SamplingParams(repetition_penalty=penalty, seed=i, **sampling), seen, [1, 2])
            for i in range(3)]
    out = Sampler()(logits, rows)
    assert all(0 <= t < vocab for t in out.token_ids)
