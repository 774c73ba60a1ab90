"""One simulated `ember serve` worker: the engine's scheduling rules (continuous batching,
chunked prefill in a per-step token budget, FCFS admission up to max_num_seqs, recompute
preemption of the newest sequence when blocks run out) over ember's real `BlockPool`, so the
prefix cache evicts exactly as a worker's does (least recently freed, a sequence's tail first).

It computes nothing: a step's duration comes from the calibrated `StepModel`, and the
simulation loop (sim.py) owns the clock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from ember.bench.fleet_sim.config import WorkerConfig
from ember.bench.fleet_sim.step_model import StepModel, StepStats
from ember.engine.block_hash import BlockHash
from ember.engine.block_pool import BlockPool
from ember.kv.events import KVEventRecorder


@dataclass(eq=False)
class SimSequence:
    """One request on one worker. `block_hashes` covers at least its prompt and answer."""

    request_id: int
    num_prompt_tokens: int
    max_tokens: int
    block_hashes: list[BlockHash]
    parent_root: BlockHash
    num_output_tokens: int = 0
    num_computed_tokens: int = 0
    num_cached_tokens: int | None = None  # prompt tokens found cached at first admission
    num_preemptions: int = 0
    block_ids: list[int] = field(default_factory=list)
    num_hashed_blocks: int = 0  # leading blocks registered in the prefix cache

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_output_tokens

    @property
    def is_done(self) -> bool:
        return self.num_output_tokens >= self.max_tokens


class Chunk(NamedTuple):
    seq: SimSequence
    start: int
    num_tokens: int


class TokenEvent(NamedTuple):
    seq: SimSequence
    is_first: bool
    is_last: bool


class SimWorker:
    def __init__(self, url: str, cfg: WorkerConfig, step_model: StepModel, block_size: int,
                 record_events: bool = True) -> None:
        self.url = url
        self.cfg = cfg
        self.step_model = step_model
        self.block_size = block_size
        self.pool = BlockPool(max(cfg.kv_tokens // block_size, 1))
        self.pool.events = KVEventRecorder() if record_events else None
        self.waiting: deque[SimSequence] = deque()
        self.running: list[SimSequence] = []
        self.is_busy = False  # a step is in progress
        self.busy_s = 0.0
        self.num_steps = 0
        self.num_preemptions = 0
        self._chunks: list[Chunk] = []

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: SimSequence) -> None:
        self.waiting.append(seq)

    # ---- one step ------------------------------------------------------------------------

    def start_step(self) -> float | None:
        """Schedule a step; returns its duration in seconds (None: nothing to run)."""
        budget = self.cfg.max_num_batched_tokens
        self._chunks = []
        preemptions = self.num_preemptions
        budget = self._schedule_running(budget)
        if self.num_preemptions == preemptions:
            self._schedule_waiting(budget)
        if not self._chunks:
            return None
        duration = self.step_model.step_s(self._stats())
        self.is_busy = True
        self.busy_s += duration
        self.num_steps += 1
        return duration

    def _stats(self) -> StepStats:
        stats = StepStats()
        for seq, start, num_tokens in self._chunks:
            # NOTE: a preempted sequence recomputes its outputs as prefill chunks
            is_decode = num_tokens == 1 and start >= seq.num_prompt_tokens
            stats.add_chunk(start, num_tokens, is_decode)
        return stats

    def finish_step(self) -> list[TokenEvent]:
        """Apply the step scheduled last: computed tokens, cached blocks, sampled tokens."""
        events = []
        for chunk in self._chunks:
            seq = chunk.seq
            seq.num_computed_tokens += chunk.num_tokens
            self._cache_full_blocks(seq)
            if seq.num_computed_tokens < seq.num_tokens:
                continue  # mid-prefill
            seq.num_output_tokens += 1
            events.append(TokenEvent(seq, seq.num_output_tokens == 1, seq.is_done))
            if seq.is_done:
                self.running.remove(seq)
                self._free(seq)
        self._chunks = []
        self.is_busy = False
        return events

    def _schedule_running(self, budget: int) -> int:
        idx = 0
        while idx < len(self.running) and budget > 0:
            seq = self.running[idx]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if num_new == 0:
                idx += 1
                continue
            if not self._allocate_or_preempt(seq, num_new):
                break
            self._chunks.append(Chunk(seq, seq.num_computed_tokens, num_new))
            budget -= num_new
            idx += 1
        return budget

    def _schedule_waiting(self, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting[0]
            self._match_prefix(seq)
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._allocate(seq, num_new):
                self._free(seq)
                seq.num_computed_tokens = seq.num_hashed_blocks = 0
                break
            if seq.num_cached_tokens is None:
                seq.num_cached_tokens = seq.num_computed_tokens
            self.waiting.popleft()
            self.running.append(seq)
            self._chunks.append(Chunk(seq, seq.num_computed_tokens, num_new))
            budget -= num_new

    # ---- blocks, as ember's KVCacheManager keeps them ------------------------------------

    def _match_prefix(self, seq: SimSequence) -> None:
        if self.cfg.enable_prefix_caching:
            for block_hash in seq.block_hashes[:seq.num_tokens // self.block_size]:
                block_id = self.pool.lookup(block_hash)
                if block_id is None:
                    break
                self.pool.take_cached(block_id)
                seq.block_ids.append(block_id)
        seq.num_hashed_blocks = len(seq.block_ids)
        seq.num_computed_tokens = min(len(seq.block_ids) * self.block_size, seq.num_tokens - 1)

    def _allocate(self, seq: SimSequence, num_new: int) -> bool:
        """Blocks to write tokens [computed, computed + num_new), copying a shared block that
        the write lands in (copy-on-write); False, changing nothing, when short of blocks."""
        table = seq.block_ids
        num_needed = -(-(seq.num_computed_tokens + num_new) // self.block_size) - len(table)
        first = seq.num_computed_tokens // self.block_size
        # NOTE: only hashed blocks can be shared; blocks past them were allocated here, alone.
        shared = [i for i in range(first, min(len(table), seq.num_hashed_blocks))
                  if self.pool.ref_count(table[i]) > 1]
        if max(num_needed, 0) + len(shared) > self.pool.num_free_blocks:
            return False
        for i in shared:
            (new_block,) = self.pool.allocate(1)
            self.pool.decref([table[i]])
            table[i] = new_block
        if num_needed > 0:
            table.extend(self.pool.allocate(num_needed))
        return True

    def _allocate_or_preempt(self, seq: SimSequence, num_new: int) -> bool:
        while not self._allocate(seq, num_new):
            victim = self.running.pop()
            self._free(victim)
            victim.num_computed_tokens = victim.num_hashed_blocks = 0
            victim.num_preemptions += 1
            self.num_preemptions += 1
            self.waiting.appendleft(victim)
            if victim is seq:
                return False
        return True

    def _cache_full_blocks(self, seq: SimSequence) -> None:
        if not self.cfg.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_ids))
        for i in range(seq.num_hashed_blocks, num_full):
            parent = seq.block_hashes[i - 1] if i else seq.parent_root
            self.pool.cache_block(seq.block_ids[i], seq.block_hashes[i], parent)
        seq.num_hashed_blocks = max(num_full, seq.num_hashed_blocks)

    def _free(self, seq: SimSequence) -> None:
        """Tail first, so the least shareable blocks are evicted first."""
        if seq.block_ids:
            self.pool.decref(reversed(seq.block_ids))
            seq.block_ids = []

    def drain_kv_events(self) -> list[dict]:
        return self.pool.events.drain() if self.pool.events is not None else []
