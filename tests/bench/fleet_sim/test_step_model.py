"""The step-time model: what a chunk adds, the fit, and the saved form."""

from __future__ import annotations

import random

import pytest

from ember.bench.fleet_sim.step_model import StepModel, StepStats, fit_quality, fit_step_model


def test_chunks_count_tokens_causal_pairs_and_context():
    stats = StepStats()
    stats.add_chunk(0, 4, is_decode=False)  # pairs 1 + 2 + 3 + 4
    stats.add_chunk(10, 2, is_decode=False)  # pairs 11 + 12
    stats.add_chunk(99, 1, is_decode=True)  # context 100
    assert (stats.prefill_tokens, stats.prefill_pairs) == (6, 10 + 23)
    assert (stats.decode_seqs, stats.decode_context) == (1, 100)


def _samples(model: StepModel, num: int, noise: float = 0.0) -> list[tuple[StepStats, float]]:
    rng = random.Random(0)
    samples = []
    for _ in range(num):
        stats = StepStats()
        for _ in range(rng.randint(0, 3)):
            stats.add_chunk(rng.randint(0, 4000), rng.randint(1, 2048), is_decode=False)
        for _ in range(rng.randint(0, 64)):
            stats.add_chunk(rng.randint(0, 8000), 1, is_decode=True)
        samples.append((stats, model.step_s(stats) * (1 + rng.uniform(-noise, noise))))
    return samples


def test_fit_recovers_the_coefficients_of_exact_steps():
    truth = StepModel(0.004, 2e-5, 3e-8, 1e-4, 5e-7)
    fitted = fit_step_model(_samples(truth, 200))
    for name, value in truth.to_json().items():
        assert getattr(fitted, name) == pytest.approx(value, rel=1e-6)
    assert fit_quality(fitted, _samples(truth, 50))["r2"] == pytest.approx(1.0)


def test_fit_keeps_coefficients_non_negative():
    truth = StepModel(0.004, 2e-5, 0.0, 1e-4, 0.0)
    fitted = fit_step_model(_samples(truth, 200, noise=0.3))
    assert all(v >= 0 for v in fitted.to_json().values())


def test_json_round_trip():
    model = StepModel(0.1, 0.2, 0.3, 0.4, 0.5)
    assert StepModel.from_json(model.to_json()) == model
