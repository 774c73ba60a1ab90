"""Arrivals and concurrency: seeded Poisson gaps (pure), the concurrency cap, errors counted,
and sessions (shared system prompt, growing history, affinity header, turns in sequence)."""

from __future__ import annotations

import asyncio
import math
import statistics

import pytest

from ember.bench.serve.client import RequestResult
from ember.bench.serve.config import ServeBenchConfig
from ember.bench.serve.datasets import TextBuilder, random_dataset, sessions_dataset
from ember.bench.serve.loadgen import LoadGenerator, arrival_times, open_http, poisson_gaps
from ember.bench.serve.report import summarize
from tests.bench.serve.fake_openai import MODEL_ID, FakeOpenAIServer


def test_poisson_gaps_are_seeded_with_mean_one_over_rate() -> None:
    gaps = poisson_gaps(4.0, 20000, seed=1)
    assert gaps == poisson_gaps(4.0, 20000, seed=1)
    assert gaps != poisson_gaps(4.0, 20000, seed=2)
    assert all(g >= 0 for g in gaps)
    assert statistics.fmean(gaps) == pytest.approx(0.25, rel=0.05)
    # exponential: the standard deviation equals the mean
    assert statistics.pstdev(gaps) == pytest.approx(0.25, rel=0.05)
    assert poisson_gaps(math.inf, 5, seed=1) == [0.0] * 5


def test_arrival_times_start_at_zero_and_accumulate() -> None:
    times = arrival_times(10.0, 100, seed=0)
    gaps = poisson_gaps(10.0, 100, seed=0)
    assert times[0] == 0.0
    assert times[-1] == pytest.approx(sum(gaps[1:]))
    assert all(b >= a for a, b in zip(times, times[1:]))
    assert arrival_times(math.inf, 3, seed=0) == [0.0, 0.0, 0.0]


def _run(cfg: ServeBenchConfig, work: list) -> tuple[list[RequestResult], float]:
    async def go() -> tuple[list[RequestResult], float]:
        async with open_http(cfg, len(work)) as http:
            gen = LoadGenerator(cfg, MODEL_ID, http)
            duration_s = await gen.run(work)
            return gen.results, duration_s

    return asyncio.run(go())


def test_random_load_respects_the_concurrency_cap_and_arrivals() -> None:
    with FakeOpenAIServer(ttft_s=0.02, itl_s=0.0) as server:
        cfg = ServeBenchConfig(url=server.url + "/v1", num_prompts=8, rate=200.0,
                               max_concurrency=2, input_len=8, output_len=3, api_key="k")
        results, duration_s = _run(cfg, random_dataset(cfg, TextBuilder()))
    assert len(results) == 8 and all(r.success for r in results)
    assert sorted(r.request_idx for r in results) == list(range(8))
    assert 1 <= server.max_in_flight <= 2
    assert all(rec.headers["Authorization"] == "Bearer k" for rec in server.received)
    assert all(rec.path == "/v1/chat/completions" for rec in server.received)
    assert duration_s >= max(r.start_s + r.e2e_s for r in results) - 1e-6
    # no request is sent before its arrival time
    times = arrival_times(cfg.rate, 8, cfg.seed)
    by_idx = sorted(results, key=lambda r: r.request_idx)
    assert all(r.start_s >= t - 1e-6 for r, t in zip(by_idx, times))


def test_errors_are_counted_and_the_run_goes_on() -> None:
    with FakeOpenAIServer(ttft_s=0.0, itl_s=0.0, error_at={1: 400, 3: 503}) as server:
        cfg = ServeBenchConfig(url=server.url, num_prompts=6, max_concurrency=1,
                               input_len=4, output_len=2, endpoint="completions")
        results, duration_s = _run(cfg, random_dataset(cfg, TextBuilder()))
    summary = summarize(results, duration_s, {})
    assert summary["num_completed"] == 4 and summary["num_errors"] == 2
    assert summary["errors_by_status"] == {"400": 1, "503": 1}
    assert summary["error_examples"]["503"] == "scripted failure 503"
    assert all("prompt" in rec.body for rec in server.received)


def test_sessions_grow_history_keep_affinity_and_run_turns_in_sequence() -> None:
    with FakeOpenAIServer(ttft_s=0.01, itl_s=0.0) as server:
        cfg = ServeBenchConfig(url=server.url, dataset="sessions", num_prompts=12, turns=4,
                               rate=math.inf, system_prompt_len=50, input_len=6,
                               output_len=3, range_ratio=0.5)
        sessions = sessions_dataset(cfg, TextBuilder())
        results, _ = _run(cfg, sessions)
    assert len(results) == 12 and all(r.success for r in results)
    by_session: dict[str, list] = {}
    for rec in server.received:
        by_session.setdefault(rec.headers["x-session-affinity"], []).append(rec)
    assert set(by_session) == {s.session_id for s in sessions}
    system = sessions[0].system_prompt
    for recs in by_session.values():
        assert len(recs) == 4
        for prev, rec in zip(recs, recs[1:]):
            assert rec.start >= prev.end  # the next turn starts after the previous one ended
            prev_msgs, msgs = prev.body["messages"], rec.body["messages"]
            assert msgs[:len(prev_msgs)] == prev_msgs
            assert msgs[len(prev_msgs)]["role"] == "assistant"
            assert msgs[len(prev_msgs)]["content"] == prev.answer  # the text actually streamed
            assert len(msgs) == len(prev_msgs) + 2
        assert all(rec.body["messages"][0] == {"role": "system", "content": system}
                   for rec in recs)
    for s in sessions:
        mine = sorted((r for r in results if r.session_id == s.session_id),
                      key=lambda r: r.turn_idx)
        assert [r.turn_idx for r in mine] == [0, 1, 2, 3]
        assert s.answers == [r.text for r in mine]
        for prev, r in zip(mine, mine[1:]):
            assert r.start_s >= prev.start_s + prev.e2e_s
            assert r.cached_tokens >= prev.prompt_tokens  # the fake's prefix match
    summary = summarize(results, 1.0, {})
    assert 0.0 < summary["prefix_cache_hit_ratio"] < 1.0
    assert summary["sessions"]["num_sessions"] == 3


def test_a_failed_turn_ends_its_session() -> None:
    with FakeOpenAIServer(ttft_s=0.0, itl_s=0.0, error_at={1: 503}) as server:
        cfg = ServeBenchConfig(url=server.url, dataset="sessions", num_prompts=3, turns=3,
                               system_prompt_len=5, input_len=3, output_len=2)
        results, _ = _run(cfg, sessions_dataset(cfg, TextBuilder()))
    assert [(r.turn_idx, r.success, r.status) for r in results] == [(0, True, 200),
                                                                    (1, False, 503)]
    assert len(server.received) == 2
