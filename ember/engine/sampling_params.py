"""SamplingParams: how one request is decoded, with vLLM's field names and meanings.

Validated on construction; an unknown or out-of-range field raises ValueError naming it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ember.structured.spec import parse_spec

_UNSET: Any = object()


@dataclass(init=False)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # top alternatives besides the chosen token
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    detokenize: bool = True
    # Grammar the output must follow: exactly one of {"json": schema}, {"json_object": True},
    # {"regex": str}, {"grammar": EBNF}, {"structural_tag": dict}, plus optional
    # "any_whitespace" (default False: one-line JSON). See ember/structured/spec.py.
    structured_output: dict | None = None

    def __init__(self, **kwargs: Any) -> None:
        known = {f.name: f for f in dataclasses.fields(self)}
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            raise ValueError(f"unknown sampling field(s) {unknown}; known: {sorted(known)}")
        for name, f in known.items():
            if name in kwargs:
                value = kwargs[name]
            elif f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
            else:
                value = f.default
            setattr(self, name, value)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._validate()

    def _validate(self) -> None:
        _check(isinstance(self.n, int) and self.n >= 1, "n", "must be an integer >= 1", self.n)
        _check(self.temperature >= 0.0, "temperature", "must be >= 0", self.temperature)
        _check(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]", self.top_p)
        _check(self.top_k == -1 or self.top_k >= 0, "top_k", "must be -1, 0 or >= 1", self.top_k)
        _check(0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]", self.min_p)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(-2.0 <= value <= 2.0, name, "must be in [-2, 2]", value)
        _check(self.repetition_penalty > 0.0, "repetition_penalty", "must be > 0",
               self.repetition_penalty)
        _check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "must be >= 1",
               self.max_tokens)
        _check(self.min_tokens >= 0, "min_tokens", "must be >= 0", self.min_tokens)
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
               "must be <= max_tokens", self.min_tokens)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or value >= 0, name, "must be >= 0", value)
        _check(all(isinstance(s, str) and s for s in self.stop), "stop",
               "must be non-empty strings", self.stop)
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               "must be non-negative token ids", self.stop_token_ids)
        _check(self.seed is None or isinstance(self.seed, int), "seed", "must be an integer",
               self.seed)
        if self.structured_output is not None:
            parse_spec(self.structured_output)
            # NOTE: a complete grammar allows only stop tokens, which min_tokens would mask.
            _check(self.min_tokens == 0, "min_tokens", "must be 0 with structured_output",
                   self.min_tokens)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def effective_top_k(self) -> int:
        return 0 if self.top_k in (0, -1) else self.top_k

    def clone(self, **changes: Any) -> SamplingParams:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values.update(changes)
        return SamplingParams(**values)


def _check(ok: bool, name: str, rule: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{name} {rule}, got {value!r}")
