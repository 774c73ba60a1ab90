"""Decode role of disaggregated serving: blocks reserved for a prompt that a prefill worker
computes and writes into them, then adopted by the request that continues here.

A reservation holds the prompt's blocks: the leading ones this worker already has cached
(the sender skips them) and fresh ones for the rest, which the prefill worker fills. It ends
when released, when it expires, or when a request adopts it: with the first token(s) the
prefill worker sampled, the request starts decoding. Only a sender that reported every block
written leads to an adoption, so no request runs on incomplete KV.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ember.engine.kv_cache_manager import WAIT_FOR_TIERS
from ember.engine.request import Request, Sequence, SequenceStatus
from ember.engine.sampling_params import SamplingParams
from ember.engine.scheduler import Scheduler, SeqUpdate
from ember.engine.scheduler_output import SampledToken


class NoRoomError(ValueError):
    """The decode worker cannot hold the prompt now (blocks or sequences)."""


@dataclass
class Reservation:
    transfer_id: str
    seq: Sequence  # holds the blocks until a request adopts them
    num_cached_blocks: int  # leading blocks this worker had cached: not sent
    expires_at: float


class RemotePrefills:
    def __init__(self, scheduler: Scheduler, ttl_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.scheduler = scheduler
        self.ttl_s = ttl_s
        self.clock = clock
        self.reservations: dict[str, Reservation] = {}

    def reserve(self, transfer_id: str, prompt_token_ids: list[int]) -> dict[str, Any]:
        """Blocks for the prompt; raises NoRoomError when they (or a sequence slot) are short,
        ValueError for a reused id or a prompt that cannot fit."""
        sched, kv = self.scheduler, self.scheduler.kv
        if transfer_id in self.reservations:
            raise ValueError(f"transfer_id {transfer_id!r} is already reserved")
        placeholder = Request(transfer_id, list(prompt_token_ids), SamplingParams(max_tokens=1),
                              self.clock())
        placeholder.max_total_tokens = sched.max_total_tokens()
        sched.check_fits(placeholder)
        if sched.num_reserved_seqs() + len(self.reservations) >= sched.config.max_num_seqs:
            raise NoRoomError("the decode worker runs max_num_seqs sequences already")
        seq = Sequence(sched.new_seq_id(), placeholder, 0, list(prompt_token_ids))
        num_cached = self._match_whole_blocks(seq)
        start = num_cached * kv.block_size
        if start < seq.num_tokens and kv.allocate_slots(seq.seq_id, start,
                                                        seq.num_tokens - start) is None:
            kv.free(seq.seq_id)
            raise NoRoomError(f"the decode worker has no free KV blocks for "
                              f"{seq.num_tokens} prompt tokens")
        self.reservations[transfer_id] = Reservation(transfer_id, seq, num_cached,
                                                     self.clock() + self.ttl_s)
        return {"transfer_id": transfer_id, "block_ids": list(kv.block_table(seq.seq_id)),
                "first_block": num_cached, "num_cached_tokens": start,
                "num_prompt_tokens": seq.num_tokens, "ttl_s": self.ttl_s,
                # the sender's deadline (wall clock): after it, the blocks may be another's
                "expires_at_unix": time.time() + self.ttl_s}

    def _match_whole_blocks(self, seq: Sequence) -> int:
        """Cached leading blocks (device or CPU tier); a prefix on disk is not waited for."""
        if seq.request.params.prompt_logprobs is not None:
            return 0
        num_computed = self.scheduler.kv.match_prefix(seq)
        if num_computed == WAIT_FOR_TIERS:
            return 0
        return seq.num_cached_blocks

    def release(self, transfer_id: str) -> bool:
        reservation = self.reservations.pop(transfer_id, None)
        if reservation is not None:
            self.scheduler.kv.free(reservation.seq.seq_id)
        return reservation is not None

    def expire(self) -> list[str]:
        now = self.clock()
        expired = [t for t, r in self.reservations.items() if r.expires_at <= now]
        for transfer_id in expired:
            self.release(transfer_id)
        return expired

    def adopt(self, request: Request, transfer_id: str,
              first_token_ids: list[int]) -> list[SeqUpdate]:
        """Start `request` from its reserved, filled blocks and the prefill worker's first
        token per sequence; the updates carry those tokens out as the request's first."""
        reservation = self.reservations.get(transfer_id)
        if reservation is None:
            raise ValueError(f"no reservation {transfer_id!r} (expired or released)")
        seq = reservation.seq
        if list(request.prompt_token_ids) != seq.token_ids:
            raise ValueError(f"the prompt differs from the one reserved as {transfer_id!r}")
        if len(first_token_ids) != request.params.n:
            raise ValueError(f"{len(first_token_ids)} first tokens for n={request.params.n}")
        del self.reservations[transfer_id]
        return self._start(request, seq, reservation.num_cached_blocks, first_token_ids)

    def _start(self, request: Request, leader: Sequence, num_cached_blocks: int,
               first_token_ids: list[int]) -> list[SeqUpdate]:
        sched, kv = self.scheduler, self.scheduler.kv
        request.max_total_tokens = sched.max_total_tokens()
        request.num_cached_tokens = min(num_cached_blocks * kv.block_size,
                                        request.num_prompt_tokens)
        leader.request = request
        leader.num_computed_tokens = leader.num_tokens
        kv.cache_full_blocks(leader)
        request.sequences = [leader]
        for i in range(1, request.params.n):
            child = Sequence(sched.new_seq_id(), request, i, list(leader.token_ids))
            kv.fork(leader.seq_id, child.seq_id)
            child.num_computed_tokens = leader.num_computed_tokens
            child.block_hashes = list(leader.block_hashes)
            child.num_cached_blocks = leader.num_cached_blocks
            request.sequences.append(child)
        sched.requests[request.request_id] = request
        updates = []
        for seq, token_id in zip(request.sequences, first_token_ids):
            seq.status = SequenceStatus.RUNNING
            sched.running.append(seq)
            sampled = SampledToken(token_id)
            seq.token_ids.append(token_id)
            update = SeqUpdate(seq, [token_id], [sampled])
            update.finished = sched.check_stop(seq, sampled)
            updates.append(update)
        return updates
