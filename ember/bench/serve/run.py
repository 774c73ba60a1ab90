"""One `ember bench serve` run end to end: model, dataset, load, summary, JSON and plot.

Starts no server; the caller points it at one.
"""

from __future__ import annotations

import asyncio
import math
import sys
from typing import Any

from ember.bench.serve.client import fetch_first_model
from ember.bench.serve.config import ServeBenchConfig
from ember.bench.serve.datasets import TextBuilder, random_dataset, sessions_dataset
from ember.bench.serve.loadgen import LoadGenerator, base_headers, open_http
from ember.bench.serve.report import summarize, to_table, write_json


def _builder(cfg: ServeBenchConfig) -> TextBuilder:
    if cfg.tokenizer is None:
        return TextBuilder()
    from ember.model.tokenizer import load_tokenizer

    return TextBuilder(load_tokenizer(cfg.tokenizer))


async def _run(cfg: ServeBenchConfig) -> tuple[str, list, float]:
    builder = _builder(cfg)
    if cfg.dataset == "sessions":
        work = sessions_dataset(cfg, builder)
    else:
        work = random_dataset(cfg, builder)
    async with open_http(cfg, len(work)) as http:
        model = cfg.model or await fetch_first_model(http, cfg.base_url, base_headers(cfg))
        gen = LoadGenerator(cfg, model, http)
        duration_s = await gen.run(work)
    return model, gen.results, duration_s


def run_serve_bench(cfg: ServeBenchConfig) -> dict[str, Any]:
    """Run the load, print the table, write the JSON/PNG asked for; returns the summary."""
    model, results, duration_s = asyncio.run(_run(cfg))
    summary = summarize(results, duration_s, cfg.slos_ms)
    unit = "sessions/s" if cfg.dataset == "sessions" else "req/s"
    rate = ("inf" if math.isinf(cfg.rate) else f"{cfg.rate:g}") + " " + unit
    print(f"ember bench serve: {cfg.dataset}, {len(results)} requests -> {cfg.endpoint_url} "
          f"({model}), rate {rate}, max concurrency {cfg.max_concurrency or '-'}")
    print(to_table(summary))
    if cfg.output is not None:
        write_json(cfg.output, cfg, model, summary, results)
        print(f"results: {cfg.output}", file=sys.stderr)
    if cfg.plot is not None:
        from ember.bench.serve.plot import write_plot

        write_plot(cfg.plot, results, f"{model} @ {rate}, {cfg.dataset}")
        print(f"plot: {cfg.plot}", file=sys.stderr)
    return summary
