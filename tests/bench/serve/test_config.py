"""ServeBenchConfig: URL handling, derived values, the JSON view, and errors naming the field."""

from __future__ import annotations

import math

import pytest

from ember.bench.serve.config import ServeBenchConfig


def test_urls_and_derived_values() -> None:
    cfg = ServeBenchConfig(url="http://h:8000/v1/", endpoint="completions", num_prompts=10,
                           turns=3, slo_e2e_ms=5.0)
    assert cfg.base_url == "http://h:8000"
    assert cfg.endpoint_url == "http://h:8000/v1/completions"
    assert ServeBenchConfig(url="http://h:8000").endpoint_url == \
        "http://h:8000/v1/chat/completions"
    assert cfg.num_sessions == 4
    assert cfg.slos_ms == {"e2e": 5.0}
    assert math.isinf(cfg.rate)


def test_json_view_hides_the_api_key() -> None:
    data = ServeBenchConfig(url="http://h", api_key="secret", rate=2.5).to_json()
    assert data["api_key"] == "***" and data["rate"] == 2.5
    assert "secret" not in str(data)


@pytest.mark.parametrize("field, value", [
    ("dataset", "other"), ("endpoint", "embeddings"), ("num_prompts", 0), ("rate", 0.0),
    ("max_concurrency", 0), ("range_ratio", 1.0), ("turns", 0), ("slo_itl_ms", -1.0),
])
def test_invalid_values_are_rejected_by_name(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        ServeBenchConfig(url="http://h", **{field: value})
