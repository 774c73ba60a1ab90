"""`ember bench prefix-cache`: the ideal-hit computation, and a tiny end-to-end run."""

from __future__ import annotations

from ember.bench.prefix_cache import (
    PrefixCacheBenchConfig,
    ideal_cached_tokens,
    prefix_cache_markdown,
    run_prefix_cache_bench,
)
from tests.factories import tiny_model_dir


def test_ideal_counts_the_longest_prefix_an_earlier_prompt_began_with():
    prompts = [[1, 2, 3, 4], [1, 2, 3, 9, 9], [1, 2, 3, 9, 9, 7], [5, 1, 2], [1, 2, 3, 4]]
    assert ideal_cached_tokens(prompts) == [0, 3, 5, 0, 4]


def test_tiny_run_reports_hits_against_the_ideal(tmp_path):
    cfg = PrefixCacheBenchConfig(model_dir=str(tiny_model_dir(tmp_path)), sessions=3, turns=3,
                                 system_prompt_len=120, input_len=16, output_len=4, rate=50.0,
                                 max_concurrency=1, device_kv_bytes=4 << 20,
                                 cpu_kv_bytes=4 << 20, num_threads=1, modes=("off", "cpu"))
    # One request at a time: concurrent first turns would race to fill the shared system
    # prompt, which the ideal (earlier prompts are cached) does not model.
    report = run_prefix_cache_bench(cfg)
    off, cpu = report["runs"]
    assert off["num_errors"] == cpu["num_errors"] == 0
    assert off["hit_ratio"] == 0.0
    assert 0.5 < cpu["ideal_hit_ratio"] <= 1.0  # the shared system prompt repeats
    assert 0.8 < cpu["of_ideal"] <= 1.05
    assert "| cpu |" in prefix_cache_markdown(report)
