"""Scheduler: continuous batching with chunked prefill, FCFS admission and recompute preemption.

Pure Python (no torch). Each step: running sequences first (decodes and unfinished prefill
chunks), then waiting ones in arrival order, all within one token budget.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass

from ember.config import SchedulerConfig
from ember.engine.kv_cache_manager import WAIT_FOR_TIERS, KVCacheManager
from ember.engine.request import FinishReason, Request, Sequence, SequenceStatus
from ember.engine.scheduler_output import (
    PromptLogprobs,
    RunnerOutput,
    SampledToken,
    ScheduledChunk,
    SchedulerOutput,
)


@dataclass
class SeqUpdate:
    """What changed for one sequence in one step."""

    seq: Sequence
    new_token_ids: list[int]
    new_logprobs: list[SampledToken]
    prompt_logprobs: PromptLogprobs | None = None
    finished: bool = False


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int) -> None:
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self._finished_seq_ids: list[int] = []
        self.num_preemptions = 0

    # ---- requests in and out -------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        request.max_total_tokens = self.max_total_tokens()
        self.check_fits(request)
        request.sequences = [
            Sequence(next(self._seq_ids), request, i, list(request.prompt_token_ids),
                     status=SequenceStatus.WAITING if i == 0 else SequenceStatus.PENDING_FORK)
            for i in range(request.params.n)
        ]
        self.requests[request.request_id] = request
        self.waiting.append(request.leader)

    def new_seq_id(self) -> int:
        return next(self._seq_ids)

    def max_total_tokens(self) -> int:
        """A sequence never outgrows the context, the whole KV cache, or (unchunked) one step."""
        limit = min(self.max_model_len, self.kv.pool.num_blocks * self.kv.block_size)
        if not self.config.enable_chunked_prefill:
            limit = min(limit, self.config.max_num_batched_tokens)
        return limit

    def check_fits(self, request: Request) -> None:
        num_prompt = request.num_prompt_tokens
        if num_prompt == 0:
            raise ValueError("prompt is empty: at least one token is needed")
        if num_prompt >= self.max_model_len:
            raise ValueError(
                f"prompt has {num_prompt} tokens but the model's context is "
                f"{self.max_model_len} (max_model_len): leave room for at least one new token"
            )
        if num_prompt >= request.max_total_tokens:
            raise ValueError(
                f"prompt has {num_prompt} tokens but the engine holds at most "
                f"{request.max_total_tokens} tokens per sequence (KV cache of "
                f"{self.kv.pool.num_blocks} blocks x {self.kv.block_size}, "
                f"max_num_batched_tokens={self.config.max_num_batched_tokens}); "
                "raise kv_cache_memory or enable chunked prefill"
            )
        if request.params.n > self.config.max_num_seqs:
            raise ValueError(
                f"n={request.params.n} exceeds max_num_seqs={self.config.max_num_seqs}")

    def abort_request(self, request_id: str) -> Request | None:
        """Finish every sequence of the request now; its blocks are free on return."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        for seq in request.sequences:
            if not seq.is_finished:
                self.finish_sequence(seq, FinishReason.ABORT)
        return request

    def finish_sequence(self, seq: Sequence, reason: FinishReason,
                        stop_reason: int | str | None = None) -> None:
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self.kv.free(seq.seq_id)
        self._finished_seq_ids.append(seq.seq_id)
        if seq.index == 0:  # children that never forked end with their leader
            for child in seq.request.sequences[1:]:
                if child.status is SequenceStatus.PENDING_FORK:
                    child.status, child.finish_reason = SequenceStatus.FINISHED, reason
        if seq.request.is_finished:
            self.requests.pop(seq.request.request_id, None)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- one step ------------------------------------------------------------------------

    def pending_tokens(self) -> tuple[int, int]:
        """(prompt tokens not yet computed, tokens still to generate at most) over unfinished
        sequences, children to be forked included: the load a router corrects its count by."""
        prefill = decode = 0
        for request in self.requests.values():
            for seq in request.sequences:
                if seq.is_finished:
                    continue
                if seq.status is not SequenceStatus.PENDING_FORK:  # forks share the prompt
                    prefill += max(seq.num_prompt_tokens - seq.num_computed_tokens, 0)
                limit = request.max_total_tokens - seq.num_prompt_tokens
                if request.params.max_tokens is not None:
                    limit = min(limit, request.params.max_tokens)
                decode += max(limit - seq.num_output_tokens, 0)
        return prefill, decode

    def schedule(self) -> SchedulerOutput:
        self.kv.poll_tiers()
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        copies: list[tuple[int, int]] = []
        num_preemptions = self.num_preemptions
        budget = self._schedule_running(budget, chunks, copies)
        if self.num_preemptions == num_preemptions:  # no room was short: admit new work
            self._schedule_waiting(budget, chunks, copies)
        finished: list[int] = []
        if chunks:  # an empty step runs nothing, so it would drop them: keep them for the next
            finished, self._finished_seq_ids = self._finished_seq_ids, []
        out = SchedulerOutput(chunks, copies, finished, sum(c.num_tokens for c in chunks))
        if chunks:  # NOTE: no forward, no overwrite: transfers can wait for a step that has one
            out.kv_saves, out.kv_loads = self.kv.take_transfers()
        return out

    def _schedule_running(self, budget: int, chunks: list[ScheduledChunk],
                          copies: list[tuple[int, int]]) -> int:
        idx = 0
        while idx < len(self.running) and budget > 0:
            seq = self.running[idx]
            num_new = self._num_new_tokens(seq, budget)
            if num_new == 0:
                idx += 1
                continue
            new_copies = self._allocate_or_preempt(seq, num_new)
            if new_copies is None:  # the sequence preempted itself
                break
            copies.extend(new_copies)
            chunks.append(self._chunk(seq, num_new))
            budget -= num_new
            idx += 1
        return budget

    def _schedule_waiting(self, budget: int, chunks: list[ScheduledChunk],
                          copies: list[tuple[int, int]]) -> None:
        idx = 0  # sequences whose cached prefix is still being read from disk are passed over
        num_reserved = self.num_reserved_seqs()
        while idx < len(self.waiting) and budget > 0:
            seq = self.waiting[idx]
            num_seqs = 1 + self._num_pending_children(seq)
            if num_reserved + num_seqs > self.config.max_num_seqs:
                break
            if not self._match_prefix(seq):
                idx += 1
                continue
            num_new = self._num_new_tokens(seq, budget)
            new_copies = None if num_new == 0 else self.kv.allocate_slots(
                seq.seq_id, seq.num_computed_tokens, num_new)
            if new_copies is None:
                self._unmatch_prefix(seq)
                break
            if seq.num_output_tokens == 0 and seq.num_preemptions == 0:
                seq.request.num_cached_tokens = seq.num_computed_tokens
            del self.waiting[idx]
            num_reserved += num_seqs
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            copies.extend(new_copies)
            chunks.append(self._chunk(seq, num_new))
            budget -= num_new

    def _match_prefix(self, seq: Sequence) -> bool:
        """A waiting sequence starts from its longest cached prefix (never when it wants
        prompt logprobs: those need every prompt position's logits); False while that prefix
        is being read from disk."""
        if seq.request.params.prompt_logprobs is not None:
            return True
        num_computed = self.kv.match_prefix(seq)
        if num_computed == WAIT_FOR_TIERS:
            return False
        seq.num_computed_tokens = num_computed
        return True

    @property
    def is_waiting_for_tiers(self) -> bool:
        return self.kv.is_reading_tiers

    def _unmatch_prefix(self, seq: Sequence) -> None:
        self.kv.free(seq.seq_id)
        seq.num_computed_tokens = 0

    def _num_new_tokens(self, seq: Sequence, budget: int) -> int:
        remaining = seq.num_tokens - seq.num_computed_tokens
        if remaining > budget and not self.config.enable_chunked_prefill:
            return 0
        return min(remaining, budget)

    def num_reserved_seqs(self) -> int:
        """Running sequences plus the n > 1 children their leaders will fork at prompt end."""
        return len(self.running) + sum(self._num_pending_children(s) for s in self.running
                                       if s.index == 0 and s.num_output_tokens == 0)

    @staticmethod
    def _num_pending_children(seq: Sequence) -> int:
        return sum(c.status is SequenceStatus.PENDING_FORK for c in seq.request.sequences[1:])

    def _allocate_or_preempt(self, seq: Sequence, num_new: int) -> list[tuple[int, int]] | None:
        """Allocate slots, preempting the newest running sequences until they fit."""
        while True:
            new_copies = self.kv.allocate_slots(seq.seq_id, seq.num_computed_tokens, num_new)
            if new_copies is not None:
                return new_copies
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return None

    def _preempt(self, seq: Sequence) -> None:
        """Recompute preemption: drop the KV, keep the tokens, go back to the queue's front."""
        self.running.remove(seq)
        self.kv.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _chunk(self, seq: Sequence, num_new: int) -> ScheduledChunk:
        start = seq.num_computed_tokens
        end = start + num_new
        samples: list[Sequence] = []
        if end == seq.num_tokens:
            samples = [seq]
            if seq.index == 0 and seq.num_output_tokens == 0:
                samples += [c for c in seq.request.sequences[1:]
                            if c.status is SequenceStatus.PENDING_FORK]
        targets = None
        params = seq.request.params
        if params.prompt_logprobs is not None and seq.index == 0 and seq.num_output_tokens == 0:
            targets = seq.token_ids[start + 1 : min(end + 1, seq.num_prompt_tokens)]
        return ScheduledChunk(seq, seq.token_ids[start:end], start,
                              self.kv.block_table(seq.seq_id), samples, targets)

    # ---- results -------------------------------------------------------------------------

    def update(self, sched: SchedulerOutput, result: RunnerOutput) -> list[SeqUpdate]:
        updates: list[SeqUpdate] = []
        for chunk in sched.chunks:
            seq = chunk.seq
            if seq.is_finished:  # aborted between schedule and update
                continue
            seq.num_computed_tokens += chunk.num_tokens
            self.kv.cache_full_blocks(seq)
            prompt_lp = result.prompt_logprobs.get(seq.seq_id)
            if not chunk.sample_seqs:
                if prompt_lp is not None:
                    updates.append(SeqUpdate(seq, [], [], prompt_lp))
                continue
            for child in chunk.sample_seqs[1:]:  # fork before any sequence can finish
                self._fork(seq, child)
            for sample_seq in chunk.sample_seqs:
                sampled = result.sampled[sample_seq.seq_id]
                sample_seq.token_ids.append(sampled.token_id)
                update = SeqUpdate(sample_seq, [sampled.token_id], [sampled],
                                   prompt_lp if sample_seq is seq else None)
                update.finished = self.check_stop(sample_seq, sampled)
                updates.append(update)
        return updates

    def _fork(self, leader: Sequence, child: Sequence) -> None:
        self.kv.fork(leader.seq_id, child.seq_id)
        child.num_computed_tokens = leader.num_computed_tokens
        child.block_hashes = list(leader.block_hashes)
        child.num_cached_blocks = leader.num_cached_blocks
        child.status = SequenceStatus.RUNNING
        self.running.append(child)

    def check_stop(self, seq: Sequence, sampled: SampledToken) -> bool:
        params = seq.request.params
        token_id = sampled.token_id
        if sampled.is_final or (seq.num_output_tokens >= params.min_tokens
                                and token_id in seq.request.stop_token_ids):
            self.finish_sequence(seq, FinishReason.STOP, token_id)
        elif params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens:
            self.finish_sequence(seq, FinishReason.LENGTH)
        elif seq.num_tokens >= seq.request.max_total_tokens:
            self.finish_sequence(seq, FinishReason.LENGTH)
        return seq.is_finished
