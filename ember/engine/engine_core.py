"""EngineCore: the engine loop. `step()` reads as schedule, execute, update.

Owns the scheduler, KV cache and runner; tokenizer-free (text lives in the front end) except that
structured output loads the tokenizer on its first request to compile grammars.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from ember.config import EngineConfig
from ember.engine.constraint import SamplingConstraint
from ember.engine.kv_sender import KVSender
from ember.engine.messages import EngineCoreOutput, EngineCoreRequest
from ember.engine.prompts import check_token_ids
from ember.engine.remote_prefill import RemotePrefills
from ember.engine.request import FinishReason, Request
from ember.engine.runner import ModelRunner
from ember.engine.scheduler import Scheduler, SeqUpdate
from ember.engine.setup import build_engine_parts
from ember.kv.events import KVEventPublisher

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        parts = build_engine_parts(config)
        self.model_info = parts.model_info
        self.runtime = parts.runtime
        self.scheduler: Scheduler = parts.scheduler
        self.runner: ModelRunner = parts.runner
        self.constraint: SamplingConstraint = parts.constraint
        self.kv_events = (KVEventPublisher(config.cache.kv_events_endpoint, parts.kv_events)
                          if parts.kv_events is not None else None)
        self.transport = parts.transport
        role = config.disagg.role
        self.remote_prefills = (RemotePrefills(self.scheduler, config.disagg.kv_reservation_ttl_s)
                                if role == "decode" else None)
        self.kv_sender = (KVSender(parts.transport, parts.kv_layout, self.scheduler.kv,
                                   self.runner.backend.block_dim + 1,
                                   layerwise=_sends_layerwise(config, self.runner.device))
                          if role == "prefill" else None)
        self._early_outputs: list[EngineCoreOutput] = []  # adopted requests' first tokens
        self._failures: list[tuple[str, str]] = []  # (request_id, why) failed mid-flight

    # ---- requests ------------------------------------------------------------------------

    def add_request(self, req: EngineCoreRequest) -> None:
        """Queue a request; raises ValueError naming the problem when it cannot be served."""
        request = Request(req.request_id, req.prompt_token_ids, req.params, req.arrival_time,
                          eos_token_ids=tuple(self.model_info.eos_token_ids))
        check_token_ids(req.prompt_token_ids, self.model_info.vocab_size)
        # NOTE: stop ids are masked in the logits under min_tokens: out of range is a crash
        check_token_ids(req.params.stop_token_ids, self.model_info.vocab_size, "stop_token_ids")
        transfer = req.kv_transfer or {}
        if "transfer_id" in transfer:
            self._adopt(request, transfer)
            return
        if transfer.get("do_remote_decode"):
            if self.kv_sender is None:
                raise ValueError(f"kv_transfer_params ask for a remote decode, but this worker's "
                                 f"role is {self.config.disagg.role!r}, not 'prefill'")
            request.kv_transfer = transfer
        self.constraint.admit(request)  # compiles a structured-output grammar (ValueError if bad)
        self.scheduler.add_request(request)

    def _adopt(self, request: Request, transfer: dict[str, Any]) -> None:
        if self.remote_prefills is None:
            raise ValueError(f"kv_transfer_params name a reservation, but this worker's role is "
                             f"{self.config.disagg.role!r}, not 'decode'")
        if request.params.structured_output is not None:
            raise ValueError("structured output cannot continue a remote prefill")
        updates = self.remote_prefills.adopt(request, str(transfer["transfer_id"]),
                                             [int(t) for t in transfer["first_token_ids"]])
        self._early_outputs += [_to_output(u) for u in updates]

    def reserve_kv(self, transfer_id: str, prompt_token_ids: list[int]) -> dict[str, Any]:
        """Decode role: blocks for a prompt a prefill worker will fill (see remote_prefill)."""
        if self.remote_prefills is None:
            raise ValueError(f"this worker's role is {self.config.disagg.role!r}; only a "
                             f"'decode' worker reserves KV for remote prefill")
        check_token_ids(prompt_token_ids, self.model_info.vocab_size)
        reply = self.remote_prefills.reserve(transfer_id, prompt_token_ids)
        return {**reply, "peer": self.transport.descriptor()}

    def release_kv(self, transfer_id: str) -> None:
        if self.remote_prefills is not None:
            self.remote_prefills.release(transfer_id)

    def take_failures(self) -> list[tuple[str, str]]:
        """Requests that failed mid-flight (a KV transfer), already aborted: (id, why)."""
        failures, self._failures = self._failures, []
        return failures

    def abort_requests(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.scheduler.abort_request(request_id)

    def stop_sequence(self, request_id: str, seq_index: int, stop_reason: str | None) -> None:
        """Finish one sequence early (a stop string matched in the front end)."""
        request = self.scheduler.requests.get(request_id)
        if request is not None and seq_index < len(request.sequences):
            self.scheduler.finish_sequence(request.sequences[seq_index], FinishReason.STOP,
                                           stop_reason)

    def close(self) -> None:
        """Finish background work that must outlive the process (disk-tier writes)."""
        if self.runner.tiers is not None:
            self.runner.tiers.close()
        if self.kv_events is not None:
            self.kv_events.close()
        if self.transport is not None:
            self.transport.close()

    def kv_snapshot(self) -> dict[str, Any]:
        """Every block hash held, by tier, and the number of the last KV-event batch it
        includes: a subscriber applies this, then the batches numbered above `seq`."""
        if self.kv_events is not None:
            self.kv_events.flush()
        return {"seq": self.kv_events.seq if self.kv_events is not None else 0,
                "endpoint": self.kv_events.endpoint if self.kv_events is not None else None,
                "block_size": self.scheduler.kv.block_size,
                "root": self.scheduler.kv.cache_root.hex(),
                "tiers": self.scheduler.kv.snapshot()}

    @property
    def has_unfinished(self) -> bool:
        return (self.scheduler.has_unfinished or bool(self._early_outputs)
                or bool(self.remote_prefills and self.remote_prefills.reservations))

    # ---- the loop ------------------------------------------------------------------------

    def step(self) -> list[EngineCoreOutput]:
        outputs, self._early_outputs = self._early_outputs, []
        if self.remote_prefills is not None:
            self.remote_prefills.expire()
        sched = self.scheduler.schedule()
        if sched.is_empty:
            self._idle()
            return outputs
        sends = self.kv_sender.plan(sched) if self.kv_sender is not None else None
        result = self.runner.execute(sched, sends.after_layer if sends is not None else None)
        if sends is not None:  # before update: the prompts' blocks are still held
            self._fail(sends.finish())
        outputs += [_to_output(u) for u in self.scheduler.update(sched, result)]
        self._publish_kv_events()
        return outputs

    def _fail(self, failures: list[tuple[str, str]]) -> None:
        for request_id, _ in failures:
            self.scheduler.abort_request(request_id)
        self._failures += failures

    def _idle(self) -> None:
        if self.scheduler.is_waiting_for_tiers or not self.scheduler.has_unfinished:
            time.sleep(0.0005)  # waiting on disk reads or reservations: do not spin the core
        self._publish_kv_events()  # disk-tier writes finish on their own thread

    def _publish_kv_events(self) -> None:
        if self.kv_events is not None:
            self.kv_events.flush()


def _sends_layerwise(config: EngineConfig, device: torch.device) -> bool:
    """On a GPU a layer's copy overlaps the next layers for free; on the CPU it takes the cores
    the forward runs on, and the hand-offs cost more than the overlap saves (BENCHMARKS.md)."""
    mode = config.disagg.kv_send_mode
    return mode == "layerwise" or (mode == "auto" and device.type == "cuda")


def _to_output(update: SeqUpdate) -> EngineCoreOutput:
    seq = update.seq
    out = EngineCoreOutput(seq.request.request_id, seq.index, update.new_token_ids,
                           num_cached_tokens=seq.request.num_cached_tokens)
    if seq.request.params.logprobs is not None and update.new_logprobs:
        out.new_logprobs = [(t.logprob, t.rank, t.top) for t in update.new_logprobs]
    if update.prompt_logprobs is not None:
        lp = update.prompt_logprobs
        out.prompt_logprobs = (lp.logprobs, lp.ranks, lp.top)
    if update.finished:
        out.finish_reason = seq.finish_reason.value
        out.stop_reason = seq.stop_reason
    return out
