"""The competitor adapters: DFloat11's row sampling, a missing package named in the error."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from ember.bench.compress import competitors
from ember.bench.compress.competitors import CompetitorMissing, DFloat11Encoder, sample_rows


def test_sample_rows_takes_whole_evenly_spaced_rows():
    bits = np.arange(100 * 8, dtype=np.uint16)
    assert sample_rows(bits, (100, 8), None) is bits
    assert sample_rows(bits, (100, 8), 800) is bits
    sample = sample_rows(bits, (100, 8), 40).reshape(-1, 8)
    assert sample.shape == (5, 8)
    assert sample[0, 0] == 0 and sample[-1, 0] == 99 * 8  # first and last rows
    assert np.all(sample % 8 == np.arange(8))  # whole rows


def test_missing_dfloat11_is_named(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(competitors.importlib.util, "find_spec",
                        lambda name, *a: None if name == "dfloat11" else real(name, *a))
    with pytest.raises(CompetitorMissing, match="dfloat11"):
        DFloat11Encoder()
