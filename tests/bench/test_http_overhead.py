"""`ember bench http-overhead` end to end on a tiny model: paired TTFTs, server torn down."""

from __future__ import annotations

import math

import psutil

from ember.bench.http_overhead import OverheadConfig, overhead_markdown, run_http_overhead
from tests.factories import tiny_model_dir


def test_http_overhead_reports_paired_ttfts_and_leaves_no_process(tmp_path):
    model_dir = tiny_model_dir(tmp_path)
    report = run_http_overhead(OverheadConfig(str(model_dir), num_requests=4, num_warmup=1,
                                              num_threads=1, kv_cache_memory=4 << 20))
    for key in ("engine_ttft_ms", "http_ttft_ms"):
        stats = report[key]
        assert 0 < stats["min"] <= stats["p50"] <= stats["p90"]
    assert all(math.isfinite(v) for v in report["overhead_ms"].values())
    assert "HTTP overhead" in overhead_markdown(report)
    left = [p.cmdline() for p in psutil.Process().children(recursive=True)
            if "resource_tracker" not in " ".join(p.cmdline())]  # multiprocessing's, for life
    assert left == []  # the server and both engine cores are gone
