"""The frozen settings of one `ember bench serve` run, validated once when built.

Only ember/bench/serve/cli.py fills it from argv; every other module receives it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

DATASETS = ("random", "sessions")
ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


@dataclass(frozen=True)
class ServeBenchConfig:
    url: str  # server root, e.g. http://127.0.0.1:8000 (a trailing /v1 is accepted)
    num_prompts: int = 100  # total requests (sessions: caps sessions x turns)
    rate: float = math.inf  # arrivals per second (requests, or sessions); inf: all at once
    dataset: str = "random"
    model: str | None = None  # None: the first id from GET /v1/models
    endpoint: str = "chat"
    max_concurrency: int | None = None  # cap on requests in flight; None: no cap
    seed: int = 0
    input_len: int = 1024  # random dataset: prompt tokens
    output_len: int = 128  # max_tokens of each request
    range_ratio: float = 0.0  # lengths uniform in [len*(1-r), len*(1+r)]
    ignore_eos: bool = False  # send vLLM's "ignore_eos": true
    tokenizer: str | None = None  # HF tokenizer dir for exact prompt lengths; None: words
    api_key: str | None = None
    slo_ttft_ms: float | None = None
    slo_itl_ms: float | None = None  # limit on each request's mean inter-token time (TPOT)
    slo_e2e_ms: float | None = None
    sessions: int | None = None  # sessions dataset: None -> ceil(num_prompts / turns)
    turns: int = 8  # sessions dataset: turns per session
    system_prompt_len: int = 4000  # sessions dataset: shared system prompt tokens
    output: Path | None = None  # JSON report path
    plot: Path | None = None  # PNG path
    request_timeout_s: float = 3600.0  # per request, whole stream

    def __post_init__(self) -> None:
        checks = [
            (self.dataset in DATASETS, f"dataset must be one of {DATASETS}"),
            (self.endpoint in ENDPOINTS, f"endpoint must be one of {tuple(ENDPOINTS)}"),
            (self.num_prompts >= 1, "num_prompts must be >= 1"),
            (self.rate > 0, "rate must be > 0 (inf: all at once)"),
            (self.max_concurrency is None or self.max_concurrency >= 1,
             "max_concurrency must be >= 1"),
            (self.input_len >= 1 and self.output_len >= 1, "input_len, output_len must be >= 1"),
            (0.0 <= self.range_ratio < 1.0, "range_ratio must be in [0, 1)"),
            (self.turns >= 1, "turns must be >= 1"),
            (self.sessions is None or self.sessions >= 1, "sessions must be >= 1"),
            (self.system_prompt_len >= 0, "system_prompt_len must be >= 0"),
        ]
        for name in ("slo_ttft_ms", "slo_itl_ms", "slo_e2e_ms"):
            value = getattr(self, name)
            checks.append((value is None or value > 0, f"{name} must be > 0"))
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def base_url(self) -> str:
        url = self.url.rstrip("/")
        return url[: -len("/v1")] if url.endswith("/v1") else url

    @property
    def endpoint_url(self) -> str:
        return self.base_url + ENDPOINTS[self.endpoint]

    @property
    def num_sessions(self) -> int:
        return self.sessions if self.sessions is not None else -(-self.num_prompts // self.turns)

    @property
    def slos_ms(self) -> dict[str, float]:
        """The SLOs that were given, keyed ttft/itl/e2e."""
        slos = {"ttft": self.slo_ttft_ms, "itl": self.slo_itl_ms, "e2e": self.slo_e2e_ms}
        return {k: v for k, v in slos.items() if v is not None}

    def to_json(self) -> dict[str, Any]:
        """The run's arguments for the report (the API key is never written)."""
        data = asdict(self)
        data["api_key"] = "***" if self.api_key else None
        data["rate"] = "inf" if math.isinf(self.rate) else self.rate
        for key in ("output", "plot"):
            data[key] = str(data[key]) if data[key] is not None else None
        return data
