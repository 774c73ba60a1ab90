"""The simulator's engine-step time model, and its least-squares fit to measured steps.

step_s = a + b x prefill tokens + c x prefill attention pairs + d x decode sequences
         + e x decode context tokens
Pure Python apart from the fit (numpy); knows nothing about which engine produced the steps.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

FEATURES = ("prefill_tokens", "prefill_pairs", "decode_seqs", "decode_context")


@dataclass
class StepStats:
    """What one engine step computes. A chunk of n tokens starting at position s adds n
    prefill tokens and n*s + n(n+1)/2 causal attention (query, key) pairs; a decode adds one
    sequence and its context s + 1."""

    prefill_tokens: int = 0
    prefill_pairs: int = 0
    decode_seqs: int = 0
    decode_context: int = 0

    def add_chunk(self, start: int, num_tokens: int, is_decode: bool) -> None:
        if is_decode:
            self.decode_seqs += 1
            self.decode_context += start + 1
        else:
            self.prefill_tokens += num_tokens
            self.prefill_pairs += num_tokens * start + num_tokens * (num_tokens + 1) // 2

    def vector(self) -> list[float]:
        return [1.0] + [float(getattr(self, name)) for name in FEATURES]


@dataclass(frozen=True)
class StepModel:
    """Seconds per step as a linear function of `StepStats` (all coefficients >= 0)."""

    base_s: float
    per_prefill_token_s: float
    per_prefill_pair_s: float
    per_decode_seq_s: float
    per_decode_context_s: float

    def step_s(self, stats: StepStats) -> float:
        return (self.base_s + self.per_prefill_token_s * stats.prefill_tokens
                + self.per_prefill_pair_s * stats.prefill_pairs
                + self.per_decode_seq_s * stats.decode_seqs
                + self.per_decode_context_s * stats.decode_context)

    def to_json(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StepModel:
        return cls(**{f.name: float(data[f.name]) for f in fields(cls)})


def fit_step_model(samples: list[tuple[StepStats, float]]) -> StepModel:
    """Least squares over (stats, measured seconds), coefficients kept >= 0 by refitting
    without any that come out negative (a small active-set NNLS)."""
    import numpy as np

    if len(samples) < len(FEATURES) + 1:
        raise ValueError(f"need at least {len(FEATURES) + 1} steps to fit, got {len(samples)}")
    x = np.array([s.vector() for s, _ in samples])
    y = np.array([t for _, t in samples])
    scale = np.maximum(x.max(axis=0), 1.0)  # columns differ by orders of magnitude
    active = list(range(x.shape[1]))
    while True:
        coef, *_ = np.linalg.lstsq(x[:, active] / scale[active], y, rcond=None)
        if (coef >= 0).all():
            break
        active = [col for col, c in zip(active, coef) if c >= 0]
    full = np.zeros(x.shape[1])
    full[active] = coef / scale[active]
    return StepModel(*(float(c) for c in full))


def fit_quality(model: StepModel, samples: list[tuple[StepStats, float]]) -> dict[str, float]:
    """R², median absolute relative error per step, and total predicted / measured time."""
    measured = [t for _, t in samples]
    predicted = [model.step_s(s) for s, _ in samples]
    mean = sum(measured) / len(measured)
    ss_tot = sum((t - mean) ** 2 for t in measured) or 1.0
    ss_res = sum((t - p) ** 2 for t, p in zip(measured, predicted))
    rel = sorted(abs(p - t) / t for t, p in zip(measured, predicted) if t > 0)
    return {"num_steps": len(samples), "r2": 1.0 - ss_res / ss_tot,
            "median_abs_rel_error": rel[len(rel) // 2] if rel else 0.0,
            "total_predicted_over_measured": sum(predicted) / sum(measured)}


def load_calibration(path: Path) -> tuple[StepModel, dict[str, Any]]:
    """The step model saved by `ember bench fleet-sim-calibrate`, and the whole record."""
    if not path.is_file():
        raise FileNotFoundError(f"no calibration at {path}: run `ember bench "
                                f"fleet-sim-calibrate --out {path}` first")
    record = json.loads(path.read_text())
    return StepModel.from_json(record["step_model"]), record
