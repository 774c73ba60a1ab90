"""What the scheduler hands the runner each step, and what the runner hands back.

Plain containers of token ids, block ids and sequence references; no torch tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ember.engine.request import Sequence


@dataclass
class ScheduledChunk:
    """One sequence's share of a step: tokens [start_pos, start_pos + len(token_ids))."""

    seq: Sequence
    token_ids: list[int]
    start_pos: int
    block_ids: list[int]  # the sequence's whole block table after allocation
    sample_seqs: list[Sequence]  # [] mid-prefill; [seq]; or all n sequences when forking
    prompt_logprob_targets: list[int] | None = None  # next-token ids to score (prompt_logprobs)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    block_copies: list[tuple[int, int]]  # (src, dst) executed before the forward
    finished_seq_ids: list[int]  # sequences finished since the last step (runner drops state)
    num_batched_tokens: int = 0
    # Prefix-cache tiers, executed before block_copies: (block_id, hash) to save, then to load.
    kv_saves: list[tuple[int, bytes]] = field(default_factory=list)
    kv_loads: list[tuple[int, bytes]] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


@dataclass
class SampledToken:
    token_id: int
    logprob: float | None = None
    rank: int | None = None
    top: list[tuple[int, float]] = field(default_factory=list)  # best alternatives
    is_final: bool = False  # the sampling constraint is complete: the sequence stops here


@dataclass
class PromptLogprobs:
    """Logprobs of prompt tokens [start_pos + 1, ...] scored in one chunk."""

    logprobs: list[float]
    ranks: list[int]
    top: list[list[tuple[int, float]]]


@dataclass
class RunnerOutput:
    sampled: dict[int, SampledToken]  # by seq_id
    prompt_logprobs: dict[int, PromptLogprobs] = field(default_factory=dict)  # by leader seq_id
