"""The run's PNG is written, non-empty and a PNG, with successes, errors and no samples."""

from __future__ import annotations

from ember.bench.serve.client import RequestResult
from ember.bench.serve.plot import write_plot


def test_plot_writes_a_png(tmp_path) -> None:
    results = [RequestResult(i, success=True, status=200, start_s=0.1 * i, ttft_s=0.05,
                             e2e_s=0.3, itl_s=[0.01, 0.02], completion_tokens=3)
               for i in range(10)]
    results.append(RequestResult(10, status=503, error="busy", start_s=0.5, e2e_s=0.01))
    path = tmp_path / "sub" / "run.png"
    write_plot(path, results, "test run")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_plot_of_only_failures(tmp_path) -> None:
    path = tmp_path / "fail.png"
    write_plot(path, [RequestResult(0, status=None, error="refused")], "all failed")
    assert path.read_bytes()[:4] == b"\x89PNG"
