"""Sampler tests: greedy, truncation, min_tokens, seeding, goodness of fit and logprobs, each
against a reference computed here from torch.softmax / torch.log_softmax."""

from __future__ import annotations

import math

import pytest
import torch

import ember.engine.sampler as sampler_module
from ember.engine.sampler import (
    Sampler,
    SamplingRow,
    compute_token_logprobs,
    make_generator,
)
from ember.engine.sampling_params import SamplingParams

# Chi-square critical values at p = 0.001, by degrees of freedom (standard tables).
CHI2_CRITICAL_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458}


def row(params: SamplingParams, *, prompt: list[int] | None = None,
        output: list[int] | None = None, generator: torch.Generator | None = None,
        suppressed: list[int] | None = None) -> SamplingRow:
    return SamplingRow(params, list(prompt or []), list(output or []), generator,
                       list(suppressed or []))


def sample_many(logits: torch.Tensor, params: SamplingParams, num_samples: int,
                seed: int = 0) -> torch.Tensor:
    """num_samples draws from one row of logits [V], in one call: [num_samples] token ids."""
    torch.manual_seed(seed)
    rows = [row(params) for _ in range(num_samples)]
    out = Sampler()(logits.repeat(num_samples, 1), rows)
    return torch.tensor(out.token_ids)


def chi_square(token_ids: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic of token_ids against probs [V] over the tokens with probs > 0, and
    its degrees of freedom. Fails if any token with probability 0 was drawn."""
    counts = torch.bincount(token_ids, minlength=probs.numel()).double()
    support = probs > 0
    assert counts[~support].sum() == 0, f"drew excluded tokens {(~support & (counts > 0))}"
    expected = probs.double()[support] * token_ids.numel()
    statistic = ((counts[support] - expected) ** 2 / expected).sum().item()
    return statistic, int(support.sum()) - 1


def assert_draws_cover(drawn: torch.Tensor, probs: torch.Tensor) -> None:
    """Every draw has probability > 0 and every token with probability > 1% was drawn."""
    assert (probs[drawn] > 0).all(), f"drew excluded tokens {drawn[probs[drawn] == 0].unique()}"
    likely = (probs > 0.01).nonzero().squeeze(1)
    assert set(likely.tolist()) <= set(drawn.tolist())


def truncated_probs(logits: torch.Tensor, temperature: float, keep: torch.Tensor) -> torch.Tensor:
    probs = torch.softmax(logits.double() / temperature, dim=-1) * keep
    return probs / probs.sum()


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Reference top-p set: a token is kept while the mass of better tokens is < top_p."""
    sorted_probs, order = probs.double().sort(descending=True)
    mass_before = sorted_probs.cumsum(0) - sorted_probs
    keep = torch.zeros_like(probs, dtype=torch.bool)
    keep[order[mass_before < top_p]] = True
    return keep


LOGITS6 = torch.tensor([2.0, 1.5, 0.7, 0.0, -0.5, -1.2])


# --- greedy ----------------------------------------------------------------------------------

def test_greedy_is_argmax_first_on_ties():
    torch.manual_seed(0)
    logits = torch.randn(9, 50)
    logits[3, [7, 20]] = 100.0  # a tie: the first index wins, as with torch.argmax
    params = [SamplingParams(temperature=t) for t in (0.0, 1e-6, 0.0)] * 3
    out = Sampler()(logits, [row(p) for p in params])
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.token_ids[3] == 7
    assert out.logprobs is None and out.ranks is None and out.top_token_ids is None


def test_mixed_batch_greedy_rows_stay_argmax_and_input_is_not_modified():
    torch.manual_seed(1)
    logits = torch.randn(6, 40)
    before = logits.clone()
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=5),
              SamplingParams(temperature=0.0, repetition_penalty=1.5),
              SamplingParams(temperature=0.9), SamplingParams(temperature=0.0, min_p=0.3),
              SamplingParams(temperature=0.7, top_p=0.5)]
    rows = [row(p, prompt=[1, 2], output=[3], suppressed=[0]) for p in params]
    out = Sampler()(logits, rows)
    assert torch.equal(logits, before)
    assert out.token_ids[0] == logits[0].argmax().item()
    assert out.token_ids[4] == logits[4].argmax().item()
    assert all(0 <= t < 40 for t in out.token_ids)


def test_bfloat16_and_non_contiguous_logits():
    torch.manual_seed(2)
    wide = torch.randn(4, 64).to(torch.bfloat16)
    logits = wide[:, ::2]  # [4, 32], non-contiguous
    out = Sampler()(logits, [row(SamplingParams(temperature=0.0, logprobs=1))] * 4)
    assert out.token_ids == logits.float().argmax(dim=-1).tolist()
    assert out.ranks == [1, 1, 1, 1]


def test_empty_batch_and_shape_mismatch():
    out = Sampler()(torch.zeros(0, 10), [])
    assert out.token_ids == []
    with pytest.raises(ValueError, match="len\\(rows\\)=2"):
        Sampler()(torch.zeros(3, 10), [row(SamplingParams())] * 2)


# --- truncation ------------------------------------------------------------------------------

def test_top_k_picks_only_the_k_best_and_all_of_them():
    torch.manual_seed(3)
    logits = torch.randn(100)
    drawn = sample_many(logits, SamplingParams(temperature=1.5, top_k=7), 4000)
    keep = torch.zeros(100, dtype=torch.bool)
    keep[logits.topk(7).indices] = True
    assert_draws_cover(drawn, truncated_probs(logits, 1.5, keep))


@pytest.mark.parametrize("vocab_size, scale, top_p", [
    (40, 1.0, 0.6),  # small vocabulary: sorted whole
    (1000, 0.3, 0.9),  # flat: the nucleus is past the CPU probe, so the whole row is sorted
    (1000, 8.0, 0.9),  # peaked: the nucleus lies within the CPU probe
])
def test_top_p_picks_only_the_nucleus(vocab_size, scale, top_p):
    torch.manual_seed(4)
    logits = torch.randn(vocab_size) * scale
    temperature = 0.8
    drawn = sample_many(logits, SamplingParams(temperature=temperature, top_p=top_p), 3000)
    keep = nucleus(torch.softmax(logits / temperature, dim=-1), top_p)
    assert_draws_cover(drawn, truncated_probs(logits, temperature, keep))


def test_top_p_applies_to_the_top_k_renormalised_distribution():
    torch.manual_seed(5)
    logits = torch.randn(300)
    params = SamplingParams(temperature=1.0, top_k=20, top_p=0.5)
    drawn = sample_many(logits, params, 3000)
    top_k_ids = logits.topk(20).indices
    renormalised = torch.zeros(300)
    renormalised[top_k_ids] = torch.softmax(logits[top_k_ids], dim=-1)
    keep = nucleus(renormalised, 0.5) & (renormalised > 0)
    assert_draws_cover(drawn, truncated_probs(logits, 1.0, keep))


def test_min_p_keeps_tokens_at_least_min_p_times_the_best():
    torch.manual_seed(6)
    logits = torch.randn(200) * 2
    temperature, min_p = 0.9, 0.2
    probs = torch.softmax(logits / temperature, dim=-1)
    keep = probs >= min_p * probs.max()
    for params in (SamplingParams(temperature=temperature, min_p=min_p),  # whole-vocab path
                   SamplingParams(temperature=temperature, min_p=min_p, top_k=150)):
        drawn = sample_many(logits, params, 3000)
        assert_draws_cover(drawn, truncated_probs(logits, temperature, keep))


def test_min_tokens_masks_suppressed_ids_until_reached():
    logits = torch.zeros(2, 10)
    logits[:, 9] = 50.0  # EOS, by far the most likely
    logits[:, 4] = 49.0  # a stop token id
    sampler = Sampler()
    for params in (SamplingParams(temperature=0.0, min_tokens=3),
                   SamplingParams(temperature=1.0, min_tokens=3, seed=1)):
        early = [row(params, output=[1, 1], suppressed=[9, 4]) for _ in range(2)]
        assert all(t not in (9, 4) for t in sampler(logits, early).token_ids)
        done = [row(params, output=[1, 1, 1], suppressed=[9, 4]) for _ in range(2)]
        assert sampler(logits, done).token_ids == [9, 9]


# --- seeding ---------------------------------------------------------------------------------

def test_make_generator_is_fixed_across_processes_and_distinct_per_sequence():
    # NOTE: constants pin the (seed, index) -> stream derivation: Python's hash() would differ
    # between processes and these would fail.
    assert make_generator(1234, 0).initial_seed() == 4290330405378768410
    assert make_generator(1234, 1).initial_seed() == 2609289421003121158
    assert make_generator(-5, 3).initial_seed() == 289003891355039093
    draws = [torch.rand(8, generator=make_generator(7, i)) for i in range(4)]
    assert torch.equal(torch.rand(8, generator=make_generator(7, 2)), draws[2])
    assert len({tuple(d.tolist()) for d in draws}) == 4


def _seeded_stream(logits_rows: list[torch.Tensor], params: SamplingParams, position: int,
                   others: list[SamplingParams], num_steps: int) -> list[int]:
    """A seeded sequence's tokens over num_steps calls, sitting at `position` among `others`."""
    generator = make_generator(99, 1)
    other_generators = [make_generator(5, i) if p.seed is not None else None
                        for i, p in enumerate(others)]
    sampler, tokens = Sampler(), []
    torch.manual_seed(position)  # unseeded neighbours draw differently in every batch
    for step in range(num_steps):
        batch = [row(p, output=[3] * step, generator=g, prompt=[1, 2, 3])
                 for p, g in zip(others, other_generators, strict=True)]
        batch.insert(position, row(params, output=[3] * step, generator=generator,
                                   prompt=[1, 2, 3]))
        noise = torch.randn(len(batch), logits_rows[0].numel())
        logits = torch.cat([noise[:position], logits_rows[step][None], noise[position + 1:]])
        tokens.append(sampler(logits, batch).token_ids[position])
    return tokens


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.3, seed=99),
    SamplingParams(temperature=0.9, seed=99, min_p=0.01, presence_penalty=0.5),
    SamplingParams(temperature=1.0, seed=99, top_p=0.95),
    SamplingParams(temperature=0.8, seed=99, top_k=100, top_p=0.9, repetition_penalty=1.2),
])
def test_seeded_row_is_independent_of_batch_and_position(params):
    torch.manual_seed(8)
    vocab_size, num_steps = 500, 12
    logits_rows = [torch.randn(vocab_size) for _ in range(num_steps)]
    alone = _seeded_stream(logits_rows, params, 0, [], num_steps)
    crowd = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0),
             SamplingParams(temperature=1.0, top_k=5), SamplingParams(temperature=0.5, top_p=0.3),
             SamplingParams(temperature=1.0, seed=3), SamplingParams(temperature=2.0, top_k=400)]
    assert _seeded_stream(logits_rows, params, 3, crowd, num_steps) == alone
    assert _seeded_stream(logits_rows, params, 6, crowd, num_steps) == alone
    assert len(set(alone)) > 1  # the stream is random, not stuck on one token


def test_top_p_probe_and_full_sort_draw_the_same_token(monkeypatch):
    torch.manual_seed(9)
    logits = torch.randn(64, 2000) * 6  # peaked enough that the probe usually covers the nucleus
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=0)

    def draw() -> list[int]:
        rows = [row(params, generator=make_generator(0, i)) for i in range(64)]
        return Sampler()(logits, rows).token_ids

    probe_results = []
    sample_among_best = sampler_module._sample_among_best

    def spy(x, num_candidates, *args, **kwargs):
        result = sample_among_best(x, num_candidates, *args, **kwargs)
        probe_results.append((num_candidates, result is not None))
        return result

    monkeypatch.setattr(sampler_module, "_sample_among_best", spy)
    probed = draw()
    assert probe_results == [(128, True)]  # the probe settled every row's nucleus
    monkeypatch.setattr(sampler_module, "_CPU_TOP_P_PROBE_K", 10**9)  # always sort everything
    assert draw() == probed
    assert probe_results[1:] == [(2000, True)]


def test_different_seq_index_gives_different_samples():
    logits = torch.zeros(1, 1000)  # uniform: two streams agree on 20 draws with p = 1e-60
    params = SamplingParams(temperature=1.0, seed=1)
    streams = []
    for index in (0, 1):
        generator = make_generator(1, index)
        streams.append([Sampler()(logits, [row(params, generator=generator)]).token_ids[0]
                        for _ in range(20)])
    assert streams[0] != streams[1]


# --- goodness of fit -------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_frequencies_match_softmax_at_temperature(temperature):
    drawn = sample_many(LOGITS6, SamplingParams(temperature=temperature), 20000)
    statistic, dof = chi_square(drawn, torch.softmax(LOGITS6.double() / temperature, dim=-1))
    assert statistic < CHI2_CRITICAL_999[dof]


@pytest.mark.parametrize("params, keep", [
    (SamplingParams(temperature=0.7, top_k=3), [1, 1, 1, 0, 0, 0]),
    # at T = 0.7 the probabilities are 0.574, 0.281, 0.090, 0.033, ...: the mass before the
    # third token is 0.855 and before the fourth 0.945.
    (SamplingParams(temperature=0.7, top_p=0.6), [1, 1, 0, 0, 0, 0]),
    (SamplingParams(temperature=0.7, top_p=0.9), [1, 1, 1, 0, 0, 0]),
    (SamplingParams(temperature=0.7, min_p=0.05), [1, 1, 1, 1, 0, 0]),
    # top-k 5 renormalised at T = 1.3: the mass before the fourth token is 0.850, the fifth 0.939
    (SamplingParams(temperature=1.3, top_k=5, top_p=0.9), [1, 1, 1, 1, 0, 0]),
])
def test_frequencies_match_the_renormalised_truncation(params, keep):
    keep_mask = torch.tensor(keep, dtype=torch.bool)
    probs = torch.softmax(LOGITS6.double() / params.temperature, dim=-1)
    if params.top_p < 1.0:  # the test's keep column must be what the reference nucleus says
        topk = torch.zeros(6, dtype=torch.bool)
        topk[:params.effective_top_k or 6] = True  # LOGITS6 is sorted
        assert torch.equal(nucleus(probs * topk / (probs * topk).sum(), params.top_p) & topk,
                           keep_mask)
    if params.min_p > 0.0:
        assert torch.equal(probs >= params.min_p * probs.max(), keep_mask)
    drawn = sample_many(LOGITS6, params, 20000, seed=1)
    statistic, dof = chi_square(drawn, truncated_probs(LOGITS6, params.temperature, keep_mask))
    assert statistic < CHI2_CRITICAL_999[dof]


def test_seeded_rows_draw_from_the_right_distribution():
    # one draw per sequence seed: the per-generator path must be as unbiased as the batched one
    num_samples = 12000
    params = SamplingParams(temperature=1.0, seed=0)
    rows = [row(params, generator=make_generator(0, i)) for i in range(num_samples)]
    out = Sampler()(LOGITS6.repeat(num_samples, 1), rows)
    statistic, dof = chi_square(torch.tensor(out.token_ids), torch.softmax(LOGITS6.double(), -1))
    assert statistic < CHI2_CRITICAL_999[dof]


def test_frequencies_after_top_p_with_the_cpu_probe():
    # 300 tokens, 4 strong ones hold ~all the mass: top_p 0.9 is settled within the probe.
    logits = torch.full((300,), -10.0)
    logits[:4] = torch.tensor([3.0, 2.5, 2.0, 1.0])
    probs = torch.softmax(logits.double(), dim=-1)
    keep = nucleus(probs, 0.9)
    assert keep.sum() == 3
    drawn = sample_many(logits, SamplingParams(temperature=1.0, top_p=0.9), 20000, seed=2)
    statistic, dof = chi_square(drawn, truncated_probs(logits, 1.0, keep))
    assert statistic < CHI2_CRITICAL_999[dof]


# --- logprobs --------------------------------------------------------------------------------

def test_logprobs_ranks_and_top_are_of_the_raw_distribution():
    torch.manual_seed(10)
    logits = torch.randn(5, 30) * 2
    params = [SamplingParams(temperature=0.0, logprobs=3, repetition_penalty=2.0),
              SamplingParams(temperature=0.5, logprobs=0, presence_penalty=1.0),
              SamplingParams(temperature=1.0),  # asks for none
              SamplingParams(temperature=1.0, top_k=4, logprobs=5, seed=2),
              SamplingParams(temperature=0.0, logprobs=1, min_tokens=5)]
    rows = [row(p, prompt=[0, 1], output=[2, 2], suppressed=[int(logits[4].argmax())],
                generator=make_generator(2, 0) if p.seed is not None else None)
            for p in params]
    out = Sampler()(logits, rows)
    reference = torch.log_softmax(logits, dim=-1)
    for i, p in enumerate(params):
        token = out.token_ids[i]
        if p.logprobs is None:
            assert math.isnan(out.logprobs[i]) and out.ranks[i] == 0
            assert out.top_token_ids[i] == [] and out.top_logprobs[i] == []
            continue
        assert out.logprobs[i] == pytest.approx(reference[i, token].item(), abs=1e-5)
        assert out.ranks[i] == int((reference[i] > reference[i, token]).sum()) + 1
        best = reference[i].topk(p.logprobs)
        assert out.top_token_ids[i] == best.indices.tolist()
        assert out.top_logprobs[i] == pytest.approx(best.values.tolist(), abs=1e-5)
    assert out.ranks[4] >= 2  # min_tokens hid the raw argmax, which still ranks first


def test_compute_token_logprobs_matches_log_softmax():
    torch.manual_seed(11)
    logits = torch.randn(7, 50)
    logits[2, :3] = 4.0  # tied best tokens share rank 1
    token_ids = torch.tensor([0, 5, 1, 49, 3, 3, 10])
    token_logprobs, ranks, top_ids, top_logprobs = compute_token_logprobs(logits, token_ids, 4)
    reference = torch.log_softmax(logits, dim=-1)
    expected = reference.gather(1, token_ids[:, None]).squeeze(1)
    torch.testing.assert_close(token_logprobs, expected)
    assert ranks.tolist() == [int((reference[i] > expected[i]).sum()) + 1 for i in range(7)]
    assert ranks[2] == 1
    best = reference.topk(4, dim=-1)
    torch.testing.assert_close(top_logprobs, best.values)
    assert torch.equal(top_ids, best.indices)
    _, _, none_ids, none_logprobs = compute_token_logprobs(logits, token_ids, 0)
    assert none_ids.shape == (7, 0) and none_logprobs.shape == (7, 0)
