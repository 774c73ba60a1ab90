"""Arrivals and concurrency: sends the dataset's requests (or sessions) at a Poisson rate.

Owns the one aiohttp ClientSession of a run; measures nothing itself (client.py does).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable

import aiohttp

from ember.bench.serve.client import RequestResult, build_payload, send_request
from ember.bench.serve.config import ServeBenchConfig
from ember.bench.serve.datasets import RandomRequest, Session


def poisson_gaps(rate: float, num: int, seed: int) -> list[float]:
    """`num` seeded exponential gaps of mean 1/rate seconds (all 0.0 when rate is inf)."""
    if math.isinf(rate):
        return [0.0] * num
    rng = random.Random(f"arrivals-{seed}")
    return [rng.expovariate(rate) for _ in range(num)]


def arrival_times(rate: float, num: int, seed: int) -> list[float]:
    """Send times relative to the start: the first at 0, then one Poisson gap after another."""
    times, now = [], 0.0
    for idx, gap in enumerate(poisson_gaps(rate, num, seed)):
        now += gap if idx else 0.0
        times.append(now)
    return times


def base_headers(cfg: ServeBenchConfig) -> dict[str, str]:
    return {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}


def open_http(cfg: ServeBenchConfig, num_connections: int) -> aiohttp.ClientSession:
    """The run's one HTTP session: connections capped at the concurrency (or the work size)."""
    limit = cfg.max_concurrency or max(1, num_connections)
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=limit, force_close=False)
    timeout = aiohttp.ClientTimeout(total=cfg.request_timeout_s)
    return aiohttp.ClientSession(connector=connector, timeout=timeout)


class LoadGenerator:
    """Sends one run's work; `results` collects every request in completion order."""

    def __init__(self, cfg: ServeBenchConfig, model: str, http: aiohttp.ClientSession) -> None:
        self.cfg = cfg
        self.model = model
        self.http = http
        self.headers = base_headers(cfg)
        self.results: list[RequestResult] = []
        self._sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
        self._t0 = 0.0
        self._num_sent = 0

    async def run(self, work: list[RandomRequest] | list[Session]) -> float:
        """Send all of `work` (requests or sessions) at the arrival rate; returns seconds taken."""
        self._t0 = time.perf_counter()
        times = arrival_times(self.cfg.rate, len(work), self.cfg.seed)
        tasks = []
        for when, item in zip(times, work):
            delay = self._t0 + when - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            job = self._session(item) if isinstance(item, Session) else self._random(item)
            tasks.append(asyncio.create_task(job))
        await asyncio.gather(*tasks)
        return time.perf_counter() - self._t0

    async def _random(self, req: RandomRequest) -> None:
        if self.cfg.endpoint == "chat":
            payload = self._payload(req.max_tokens, messages=req.messages())
        else:
            payload = self._payload(req.max_tokens, prompt=req.prompt)
        await self._send(payload, self.headers, lambda idx: RequestResult(idx))

    async def _session(self, session: Session) -> None:
        """A session's turns one after another; a failed turn ends the session."""
        headers = {**self.headers, "x-session-affinity": session.session_id}
        for turn_idx, turn in enumerate(session.turns):
            if self.cfg.endpoint == "chat":
                payload = self._payload(turn.max_tokens, messages=session.messages(turn_idx))
            else:
                payload = self._payload(turn.max_tokens, prompt=session.prompt(turn_idx))
            result = await self._send(payload, headers, lambda idx, t=turn_idx: RequestResult(
                idx, session_id=session.session_id, turn_idx=t))
            if not result.success:
                return
            session.add_answer(result.text)

    def _payload(self, max_tokens: int, **content) -> dict:
        return build_payload(self.cfg.endpoint, self.model, max_tokens,
                             ignore_eos=self.cfg.ignore_eos, **content)

    async def _send(self, payload: dict, headers: dict[str, str],
                    new_result: Callable[[int], RequestResult]) -> RequestResult:
        result = new_result(self._num_sent)
        self._num_sent += 1
        job: Awaitable[RequestResult] = send_request(self.http, self.cfg.endpoint_url, payload,
                                                     headers, result, self._t0)
        if self._sem is None:
            await job
        else:
            async with self._sem:
                await job
        self.results.append(result)
        return result
