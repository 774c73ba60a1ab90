"""Tests of the benchmark's request set (determinism, length ranges) and a smoke run of
`ember bench throughput --engines ember` on a tiny model (no timing assertions)."""

from __future__ import annotations

import json

import pytest

from ember.bench.models import MODEL_SIZES, count_parameters
from ember.bench.workload import OUTPUT_LEN_RANGE, PROMPT_LEN_RANGE, Workload, make_workload
from tests.factories import tiny_model_dir


def test_workload_is_deterministic() -> None:
    a = make_workload(64, 32000, seed=0)
    b = make_workload(64, 32000, seed=0)
    c = make_workload(64, 32000, seed=1)
    assert a == b
    assert a != c
    assert Workload.from_json(json.loads(json.dumps(a.to_json()))) == a


@pytest.mark.parametrize("num_requests", [1, 4, 48, 64])
def test_workload_lengths_are_spread_over_the_ranges(num_requests: int) -> None:
    w = make_workload(num_requests, 1000, seed=3)
    prompt_lens = [len(r.prompt_token_ids) for r in w.requests]
    output_lens = [r.max_tokens for r in w.requests]
    assert len(w.requests) == num_requests
    assert all(PROMPT_LEN_RANGE[0] <= n <= PROMPT_LEN_RANGE[1] for n in prompt_lens)
    assert all(OUTPUT_LEN_RANGE[0] <= n <= OUTPUT_LEN_RANGE[1] for n in output_lens)
    if num_requests >= 2:  # both ends of each range are present
        assert (min(prompt_lens), max(prompt_lens)) == PROMPT_LEN_RANGE
        assert (min(output_lens), max(output_lens)) == OUTPUT_LEN_RANGE
    assert all(16 <= t < 1000 for r in w.requests for t in r.prompt_token_ids)
    assert w.num_output_tokens == sum(output_lens)


def test_repeats_share_lengths_but_not_tokens() -> None:
    a, b = make_workload(64, 32000, seed=0), make_workload(64, 32000, seed=1000)
    assert sorted(len(r.prompt_token_ids) for r in a.requests) == sorted(
        len(r.prompt_token_ids) for r in b.requests)
    assert sorted(r.max_tokens for r in a.requests) == sorted(r.max_tokens for r in b.requests)
    assert a.num_output_tokens == b.num_output_tokens
    assert a.requests[0].prompt_token_ids[:8] != b.requests[0].prompt_token_ids[:8]


def test_workload_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_requests"):
        make_workload(0, 1000)
    with pytest.raises(ValueError, match="vocab_size"):
        make_workload(4, 10)


def test_model_sizes_land_near_their_names() -> None:
    def params(size: str) -> int:
        shape = MODEL_SIZES[size]
        return count_parameters({
            "hidden_size": shape["hidden_size"], "intermediate_size": shape["intermediate_size"],
            "num_attention_heads": shape["num_heads"], "num_key_value_heads": shape["num_kv_heads"],
            "num_hidden_layers": shape["num_layers"], "vocab_size": shape["vocab_size"],
            "tie_word_embeddings": shape["tie_word_embeddings"]})["total"]

    assert 8e6 < params("10m") < 13e6
    assert 220e6 < params("250m") < 280e6


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_throughput_smoke_ember_only(tmp_path, dtype) -> None:
    from ember.bench.cli import main

    model_dir = tiny_model_dir(tmp_path, dtype="bfloat16", name="tiny-bf16")
    out = tmp_path / "out"
    code = main(["bench", "throughput", "--model", str(model_dir), "--engines", "ember",
                 "--num-prompts", "4", "--num-warmup", "1", "--kv-cache-gib", "0.05",
                 "--dtype", dtype, "--out", str(out)])
    assert code == 0
    report = json.loads((out / "throughput.json").read_text())
    assert report["config"]["dtype"] == dtype
    result = report["runs"][0]["engines"]["ember"]
    assert "error" not in result, result
    assert result["exact_lengths"]
    assert result["num_useful_tokens"] == report["runs"][0]["workload"]["num_output_tokens"]
    assert result["output_tok_s"] > 0
    assert (out / "throughput.md").read_text().count("| ember |") == 1
