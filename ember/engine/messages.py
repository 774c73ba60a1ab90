"""Everything that crosses the engine-core process boundary: plain, msgpack-serialisable shapes.

Versioned by shape: a field added here is added with a default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ember.engine.sampling_params import SamplingParams

# One sampled token's logprob info: (logprob, rank, [(token_id, logprob), ...]).
TokenLogprob = tuple[float, int, list[tuple[int, float]]]


@dataclass
class EngineCoreRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float

    def to_wire(self) -> dict[str, Any]:
        params = {f.name: getattr(self.params, f.name) for f in dataclasses.fields(self.params)}
        return {"request_id": self.request_id, "prompt_token_ids": self.prompt_token_ids,
                "params": params, "arrival_time": self.arrival_time}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> EngineCoreRequest:
        return cls(data["request_id"], list(data["prompt_token_ids"]),
                   SamplingParams(**data["params"]), data["arrival_time"])


@dataclass
class EngineCoreOutput:
    """New tokens of one sequence in one step, and whether it finished."""

    request_id: str
    seq_index: int
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list[TokenLogprob] | None = None
    # Prompt logprobs scored this step: (logprobs, ranks, tops) for consecutive prompt tokens.
    prompt_logprobs: tuple[list[float], list[int], list[list[tuple[int, float]]]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None  # the request was refused (bad input); nothing else is set

    def to_wire(self) -> list[Any]:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]

    @classmethod
    def from_wire(cls, data: list[Any]) -> EngineCoreOutput:
        return cls(*data)
