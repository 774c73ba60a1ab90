"""EngineCore: the engine loop. `step()` reads as schedule, execute, update.

Owns the scheduler, KV cache and runner; tokenizer-free (text lives in the front end) except that
structured output loads the tokenizer on its first request to compile grammars.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ember.config import EngineConfig
from ember.engine.constraint import SamplingConstraint
from ember.engine.messages import EngineCoreOutput, EngineCoreRequest
from ember.engine.prompts import check_token_ids
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

    # ---- requests ------------------------------------------------------------------------

    def add_request(self, req: EngineCoreRequest) -> None:
        """Queue a request; raises ValueError naming the problem when it cannot be served."""
        request = Request(req.request_id, req.prompt_token_ids, req.params, req.arrival_time,
                          eos_token_ids=tuple(self.model_info.eos_token_ids))
        check_token_ids(req.prompt_token_ids, self.model_info.vocab_size)
        self.constraint.admit(request)  # compiles a structured-output grammar (ValueError if bad)
        self.scheduler.add_request(request)

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
        return self.scheduler.has_unfinished

    # ---- the loop ------------------------------------------------------------------------

    def step(self) -> list[EngineCoreOutput]:
        sched = self.scheduler.schedule()
        if sched.is_empty:
            self._idle()
            return []
        result = self.runner.execute(sched)
        outputs = [_to_output(u) for u in self.scheduler.update(sched, result)]
        self._publish_kv_events()
        return outputs

    def _idle(self) -> None:
        if self.scheduler.is_waiting_for_tiers:
            time.sleep(0.0005)  # requests wait on disk reads: do not spin the core
        self._publish_kv_events()  # disk-tier writes finish on their own thread

    def _publish_kv_events(self) -> None:
        if self.kv_events is not None:
            self.kv_events.flush()


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
