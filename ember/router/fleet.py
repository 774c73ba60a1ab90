"""The router's workers: who they are, whether they are healthy (active checks, passive failures,
a circuit breaker each), and the load in tokens the router has put on each.

Load is counted when a request is dispatched and released exactly once, on every path
(`LoadTicket`); it never reads a worker's queues.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class Worker:
    url: str
    is_healthy: bool = False  # set by the first health check
    is_draining: bool = False
    consecutive_failures: int = 0
    breaker_open_until: float = 0.0
    prefill_tokens: int = 0  # uncached prompt tokens of requests with no first byte yet
    running: int = 0  # requests in flight
    decode_tokens: int = 0  # max_tokens still to come, over requests in flight
    model_ids: list[str] = field(default_factory=list)
    role: str = "both"  # "prefill" | "decode" | "both", as the worker reports it
    # load the router did not send (other routers, direct clients), from the worker's /load:
    # what it reported minus what this router had counted on it at that moment
    external_prefill_tokens: int = 0
    external_decode_tokens: int = 0

    @property
    def load_prefill_tokens(self) -> int:
        return self.prefill_tokens + self.external_prefill_tokens

    @property
    def load_decode_tokens(self) -> int:
        return self.decode_tokens + self.external_decode_tokens

    def correct_load(self, report: dict[str, Any]) -> None:
        self.role = str(report.get("role", "both"))
        self.external_prefill_tokens = max(int(report["prefill_tokens"]) - self.prefill_tokens,
                                           0)
        self.external_decode_tokens = max(int(report["decode_tokens"]) - self.decode_tokens, 0)

    @property
    def is_eligible(self) -> bool:
        return self.is_healthy and not self.is_draining and time.monotonic() >= \
            self.breaker_open_until

    def snapshot(self) -> dict[str, Any]:
        return {"url": self.url, "healthy": self.is_healthy, "draining": self.is_draining,
                "breaker_open": time.monotonic() < self.breaker_open_until,
                "prefill_tokens": self.prefill_tokens, "running": self.running,
                "decode_tokens": self.decode_tokens,
                "external_prefill_tokens": self.external_prefill_tokens,
                "external_decode_tokens": self.external_decode_tokens, "role": self.role,
                "models": self.model_ids}


class LoadTicket:
    """One request's load on one worker: prefill until its first byte, decode until its end."""

    def __init__(self, worker: Worker, prefill_tokens: int, decode_tokens: int) -> None:
        self.worker = worker
        self._prefill = prefill_tokens
        self._decode = decode_tokens
        worker.prefill_tokens += prefill_tokens
        worker.decode_tokens += decode_tokens
        worker.running += 1
        self._is_open = True

    def first_byte(self) -> None:
        self.worker.prefill_tokens -= self._prefill
        self._prefill = 0

    def release(self) -> None:
        """Idempotent: the request ended (done, failed, aborted)."""
        if not self._is_open:
            return
        self._is_open = False
        self.first_byte()
        self.worker.decode_tokens -= self._decode
        self.worker.running -= 1


class Fleet:
    def __init__(self, urls: list[str], *, failure_threshold: int = 3,
                 breaker_s: float = 10.0) -> None:
        self.workers: dict[str, Worker] = {}
        self.failure_threshold = failure_threshold
        self.breaker_s = breaker_s
        for url in urls:
            self.add(url)

    def add(self, url: str) -> Worker:
        url = url.rstrip("/")
        return self.workers.setdefault(url, Worker(url))

    def remove(self, url: str) -> Worker | None:
        return self.workers.pop(url.rstrip("/"), None)

    def eligible(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.is_eligible]

    def serving(self, exclude: set[str] | frozenset[str] = frozenset()) -> list[Worker]:
        """Eligible workers that take whole requests (all but prefill-only ones)."""
        return [w for w in self.eligible() if w.role != "prefill" and w.url not in exclude]

    def prefillers(self) -> list[Worker]:
        return [w for w in self.eligible() if w.role == "prefill"]

    def record_failure(self, worker: Worker, why: str) -> None:
        worker.consecutive_failures += 1
        if worker.consecutive_failures >= self.failure_threshold:
            worker.breaker_open_until = time.monotonic() + self.breaker_s
            logger.warning("worker %s: circuit open for %.0fs after %d failures (%s)",
                           worker.url, self.breaker_s, worker.consecutive_failures, why)

    def record_success(self, worker: Worker) -> None:
        worker.consecutive_failures = 0
        worker.breaker_open_until = 0.0

    @property
    def total_load(self) -> dict[str, int]:
        return {"prefill_tokens": sum(w.prefill_tokens for w in self.workers.values()),
                "running": sum(w.running for w in self.workers.values()),
                "decode_tokens": sum(w.decode_tokens for w in self.workers.values())}

    async def check_health(self, http: Any) -> None:
        """One round of active checks: GET /health (and /v1/models once) on every worker, and
        GET /load where a worker has it."""
        await asyncio.gather(*(self._check(http, w) for w in list(self.workers.values())))

    async def _check(self, http: Any, worker: Worker) -> None:
        import aiohttp

        try:
            async with http.get(f"{worker.url}/health",
                                timeout=aiohttp.ClientTimeout(total=2)) as resp:
                healthy = resp.status == 200
            if healthy and not worker.model_ids:
                async with http.get(f"{worker.url}/v1/models",
                                    timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    worker.model_ids = [m["id"] for m in (await resp.json())["data"]]
        except (TimeoutError, aiohttp.ClientError, KeyError, ValueError):
            healthy = False
        if healthy != worker.is_healthy:
            logger.info("worker %s is %s", worker.url, "healthy" if healthy else "unhealthy")
        worker.is_healthy = healthy
        if healthy:
            worker.consecutive_failures = 0
            await self._read_load(http, worker)

    @staticmethod
    async def _read_load(http: Any, worker: Worker) -> None:
        """A slow or missing /load (a busy engine, another server) is not a health failure:
        the router's own count is all there is until the next report."""
        import aiohttp

        try:
            async with http.get(f"{worker.url}/load",
                                timeout=aiohttp.ClientTimeout(total=2)) as resp:
                if resp.status == 200:
                    worker.correct_load(await resp.json())
                    return
        except (TimeoutError, aiohttp.ClientError, KeyError, ValueError, TypeError):
            pass
        worker.external_prefill_tokens = worker.external_decode_tokens = 0

    async def run_health_checks(self, http: Any, interval_s: float) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self.check_health(http)
            await asyncio.sleep(interval_s)
