"""Requests and their sequences: the engine core's bookkeeping of what to compute.

A request is what a user submitted; it has `n` sequences, each one stream of tokens with
its own KV blocks. Pure Python: no torch here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ember.engine.sampling_params import SamplingParams


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"


class SequenceStatus(enum.Enum):
    PENDING_FORK = "pending_fork"  # sequence i > 0 of an n > 1 request, before its prompt is done
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request: Request
    index: int  # which of the request's n samples
    token_ids: list[int]  # prompt + output so far
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    num_preemptions: int = 0
    constraint_state: object | None = None  # the SamplingConstraint's (e.g. a grammar matcher)
    block_hashes: list[bytes] = field(default_factory=list)  # chained, of its full blocks
    num_cached_blocks: int = 0  # leading blocks registered in the prefix cache

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return self.request.num_prompt_tokens

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.request.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.request.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def is_prefilling(self) -> bool:
        """True while more than the last sampled token remains to be computed."""
        return self.num_tokens - self.num_computed_tokens > 1 or self.num_output_tokens == 0


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    eos_token_ids: tuple[int, ...] = ()
    max_total_tokens: int = 0  # context limit: prompt + outputs never exceed it
    sequences: list[Sequence] = field(default_factory=list)
    stop_token_ids: frozenset[int] = frozenset()  # EOS (unless ignore_eos) + stop_token_ids
    sorted_stop_token_ids: list[int] = field(default_factory=list)  # masked under min_tokens
    constraint: object | None = None  # set by the SamplingConstraint (e.g. a compiled grammar)
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    kv_transfer: dict | None = None  # prefill role: the decode worker's reserved blocks

    def __post_init__(self) -> None:
        ids = set(self.params.stop_token_ids)
        if not self.params.ignore_eos:
            ids.update(self.eos_token_ids)
        self.stop_token_ids = frozenset(ids)
        self.sorted_stop_token_ids = sorted(ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def leader(self) -> Sequence:
        return self.sequences[0]

    @property
    def is_finished(self) -> bool:
        return all(seq.is_finished for seq in self.sequences)
