"""A PNG of one run: TTFT and ITL CDFs, E2E and TTFT over the run's time.

Draws with matplotlib's Agg canvas directly (no pyplot, no display, no global backend).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ember.bench.serve.client import RequestResult


def _cdf(ax, values_ms: list[float], title: str) -> None:
    if values_ms:
        xs = np.sort(np.asarray(values_ms))
        ax.plot(xs, np.arange(1, xs.size + 1) / xs.size)
    ax.set_title(title)
    ax.set_xlabel("ms")
    ax.set_ylabel("fraction of samples")
    ax.grid(True, alpha=0.3)


def _over_time(ax, results: list[RequestResult]) -> None:
    ok = [r for r in results if r.success]
    failed = [r for r in results if not r.success]
    ax.scatter([r.start_s for r in ok], [r.e2e_s * 1e3 for r in ok], s=6, label="E2E")
    ax.scatter([r.start_s for r in ok if r.ttft_s is not None],
               [r.ttft_s * 1e3 for r in ok if r.ttft_s is not None], s=6, label="TTFT")
    if failed:
        ax.scatter([r.start_s for r in failed], [0.0] * len(failed), s=12, marker="x",
                   color="red", label="error")
    ax.set_title("latency by send time")
    ax.set_xlabel("s since start")
    ax.set_ylabel("ms")
    ax.legend(loc="upper left", fontsize="small")
    ax.grid(True, alpha=0.3)


def _in_flight(ax, results: list[RequestResult]) -> None:
    events = sorted([(r.start_s, 1) for r in results if r.e2e_s is not None]
                    + [(r.start_s + r.e2e_s, -1) for r in results if r.e2e_s is not None])
    times, counts, now = [0.0], [0], 0
    for when, step in events:
        now += step
        times.append(when)
        counts.append(now)
    ax.step(times, counts, where="post")
    ax.set_title("requests in flight")
    ax.set_xlabel("s since start")
    ax.grid(True, alpha=0.3)


def write_plot(path: Path, results: list[RequestResult], title: str) -> None:
    fig = Figure(figsize=(11, 8), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    ok = [r for r in results if r.success]
    _cdf(axes[0][0], [r.ttft_s * 1e3 for r in ok if r.ttft_s is not None], "TTFT CDF")
    _cdf(axes[0][1], [g * 1e3 for r in ok for g in r.itl_s], "ITL CDF")
    _over_time(axes[1][0], results)
    _in_flight(axes[1][1], results)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
