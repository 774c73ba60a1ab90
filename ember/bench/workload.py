"""The benchmark's request set: seeded prompt token ids and per-request output lengths.

Pure Python (no torch): every engine, in every venv, receives exactly these ids and lengths.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

PROMPT_LEN_RANGE = (16, 384)
OUTPUT_LEN_RANGE = (16, 192)


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    max_tokens: int  # exactly this many tokens are generated (greedy, ignore_eos)


@dataclass(frozen=True)
class Workload:
    seed: int
    requests: list[BenchRequest]

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(r.prompt_token_ids) for r in self.requests)

    @property
    def num_output_tokens(self) -> int:
        """Useful output tokens: the sum of each request's own output length."""
        return sum(r.max_tokens for r in self.requests)

    def head(self, num_requests: int) -> Workload:
        return Workload(self.seed, self.requests[:num_requests])

    def to_json(self) -> dict[str, Any]:
        return {"seed": self.seed, "requests": [asdict(r) for r in self.requests]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Workload:
        return cls(data["seed"], [BenchRequest(**r) for r in data["requests"]])


def _spread(rng: random.Random, num: int, low: int, high: int) -> list[int]:
    """`num` lengths evenly spaced over [low, high] (both ends included), in seeded order."""
    if num == 1:
        return [(low + high) // 2]
    lengths = [round(low + (high - low) * i / (num - 1)) for i in range(num)]
    rng.shuffle(lengths)
    return lengths


def make_workload(
    num_requests: int,
    vocab_size: int,
    seed: int = 0,
    prompt_len_range: tuple[int, int] = PROMPT_LEN_RANGE,
    output_len_range: tuple[int, int] = OUTPUT_LEN_RANGE,
    first_token_id: int = 16,
) -> Workload:
    """Deterministic for given arguments; token ids avoid the first ids (special tokens)."""
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    if not first_token_id < vocab_size:
        raise ValueError(f"vocab_size={vocab_size} leaves no ordinary token ids")
    rng = random.Random(seed)
    prompt_lens = _spread(rng, num_requests, *prompt_len_range)
    output_lens = _spread(rng, num_requests, *output_len_range)
    requests = [
        BenchRequest([rng.randrange(first_token_id, vocab_size) for _ in range(p_len)], o_len)
        for p_len, o_len in zip(prompt_lens, output_lens)
    ]
    return Workload(seed, requests)
