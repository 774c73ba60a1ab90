"""The discrete-event loop: sessions arrive, each turn is routed by ember's real router code
(`Dispatcher` over `fleet.Worker` objects whose load is counted with `LoadTicket`, as the
proxy counts it), runs on a simulated worker, and the next turn follows the answer after a
think time. Virtual time only: nothing sleeps.

The router's cache view (cache_view.py) follows each simulated worker's KV events as the step
that produced them ends: events arrive with zero lag.
"""

from __future__ import annotations

import heapq
import itertools
from array import array
from dataclasses import dataclass, field

from ember.bench.fleet_sim.cache_view import FleetCacheView
from ember.bench.fleet_sim.config import POLICY_SPECS, WorkerConfig
from ember.bench.fleet_sim.oracle import Oracle
from ember.bench.fleet_sim.step_model import StepModel
from ember.bench.fleet_sim.worker import SimSequence, SimWorker
from ember.bench.fleet_sim.workload import CACHE_ROOT, SimSession, Trace
from ember.router.fleet import LoadTicket, Worker
from ember.router.policy import RoutingRequest
from ember.router.routing import Dispatcher, make_policy

_STEP_END, _TURN = 0, 1


@dataclass
class RequestRecord:
    session_idx: int
    turn_idx: int
    worker_url: str
    reason: str
    arrival_s: float
    num_prompt_tokens: int
    num_output_tokens: int
    predicted_cached_tokens: int
    oracle_cached_tokens: int
    num_cached_tokens: int = 0
    first_token_s: float | None = None
    last_token_s: float | None = None
    finish_s: float | None = None

    @property
    def ttft_s(self) -> float:
        assert self.first_token_s is not None
        return self.first_token_s - self.arrival_s


@dataclass
class SimResult:
    policy: str
    num_workers: int
    sessions_per_s: float
    records: list[RequestRecord]
    itl_s: array  # every gap between two tokens of one request
    end_s: float
    worker_busy_s: list[float]
    num_preemptions: int
    affinity_moves: int  # Dispatcher-reported moves of sessions that sent the header
    counters_at_end: dict[str, int] = field(default_factory=dict)  # summed over workers


@dataclass
class _InFlight:
    record: RequestRecord
    ticket: LoadTicket
    session: SimSession


class FleetSim:
    def __init__(self, trace: Trace, policy: str, num_workers: int, sessions_per_s: float,
                 worker_cfg: WorkerConfig, step_model: StepModel, decode_weight: float = 0.25,
                 seed: int = 0) -> None:
        if policy not in POLICY_SPECS:
            raise ValueError(f"unknown policy {policy!r}; known: {list(POLICY_SPECS)}")
        router_policy, self.sends_header = POLICY_SPECS[policy]
        self.trace = trace
        self.policy = policy
        self.sessions_per_s = sessions_per_s
        self.block_size = trace.cfg.block_size
        urls = [f"http://worker-{i:02d}" for i in range(num_workers)]
        self.workers = [Worker(url, is_healthy=True) for url in urls]
        self.sim_workers = {url: SimWorker(url, worker_cfg, step_model, self.block_size)
                            for url in urls}
        self.dispatcher = Dispatcher(make_policy(router_policy, decode_weight, seed),
                                     session_affinity=self.sends_header)
        self.cache_view = FleetCacheView(urls)
        for url in urls:
            self.dispatcher.add_worker(url)
        self.oracle = Oracle(self.block_size)
        self.records: list[RequestRecord] = []
        self.itl_s = array("d")
        self.affinity_moves = 0
        self._in_flight: dict[int, _InFlight] = {}
        self._heap: list[tuple[float, int, int, object]] = []
        self._tiebreak = itertools.count()
        self._request_ids = itertools.count()
        self.now = 0.0

    def run(self) -> SimResult:
        for idx, start in enumerate(self.trace.session_starts(self.sessions_per_s)):
            self._push(start, _TURN, (idx, 0, None))
        while self._heap:
            self.now, _, kind, payload = heapq.heappop(self._heap)
            if kind == _STEP_END:
                self._step_end(payload)
            else:
                self._turn(*payload)
        return self._result()

    def _push(self, when: float, kind: int, payload: object) -> None:
        heapq.heappush(self._heap, (when, next(self._tiebreak), kind, payload))

    # ---- a turn arrives at the router ----------------------------------------------------

    def _turn(self, session_idx: int, turn_idx: int, session: SimSession | None) -> None:
        session = session or self.trace.session(session_idx)
        turn = session.turns[turn_idx]
        num_prompt = session.prompt_lens[turn_idx]
        num_blocks = num_prompt // self.block_size
        hex_hashes = session.hex_hashes[:num_blocks]
        req = RoutingRequest(num_prompt, turn.max_tokens,
                             session.session_id if self.sends_header else None,
                             self.cache_view.cached_tiers(hex_hashes), tuple(hex_hashes),
                             self.block_size)
        routed = self.dispatcher.decide(req, self.workers)
        assert routed is not None, "every simulated worker is eligible"
        decision = routed.decision
        self.affinity_moves += bool(routed.session_move)
        ticket = LoadTicket(decision.worker, num_prompt - decision.predicted_cached_tokens,
                            turn.max_tokens)
        record = RequestRecord(
            session_idx, turn_idx, decision.worker.url, decision.reason, self.now, num_prompt,
            turn.max_tokens, decision.predicted_cached_tokens,
            self.oracle.arrive(session.block_hashes, num_prompt, turn.max_tokens))
        self.records.append(record)
        request_id = next(self._request_ids)
        self._in_flight[request_id] = _InFlight(record, ticket, session)
        worker = self.sim_workers[decision.worker.url]
        worker.add(SimSequence(request_id, num_prompt, turn.max_tokens, session.block_hashes,
                               CACHE_ROOT))
        if not worker.is_busy:
            self._start_step(worker)

    # ---- a worker's step ends ------------------------------------------------------------

    def _start_step(self, worker: SimWorker) -> None:
        duration = worker.start_step()
        self._publish_kv_events(worker)
        if duration is not None:
            self._push(self.now + duration, _STEP_END, worker)
        elif worker.has_work:
            raise RuntimeError(f"{worker.url}: a request needs more KV blocks than the cache "
                               f"holds ({worker.pool.num_blocks}); raise kv_tokens")

    def _step_end(self, worker: SimWorker) -> None:
        for event in worker.finish_step():
            flight = self._in_flight[event.seq.request_id]
            record = flight.record
            if event.is_first:
                flight.ticket.first_byte()
                record.first_token_s = self.now
                record.num_cached_tokens = event.seq.num_cached_tokens or 0
            else:
                self.itl_s.append(self.now - record.last_token_s)
            record.last_token_s = self.now
            if event.is_last:
                flight.ticket.release()
                record.finish_s = self.now
                del self._in_flight[event.seq.request_id]
                self._next_turn(flight.session, record.turn_idx + 1)
        self._start_step(worker)

    def _next_turn(self, session: SimSession, turn_idx: int) -> None:
        if turn_idx < len(session.turns):
            self._push(self.now + session.turns[turn_idx].think_s, _TURN,
                       (session.session_idx, turn_idx, session))

    def _publish_kv_events(self, worker: SimWorker) -> None:
        self.cache_view.apply_events(worker.url, worker.drain_kv_events())

    def _result(self) -> SimResult:
        counters = {"prefill_tokens": sum(w.prefill_tokens for w in self.workers),
                    "decode_tokens": sum(w.decode_tokens for w in self.workers),
                    "running": sum(w.running for w in self.workers),
                    "in_flight": len(self._in_flight)}
        workers = list(self.sim_workers.values())
        return SimResult(self.policy, len(self.workers), self.sessions_per_s, self.records,
                         self.itl_s, self.now, [w.busy_s for w in workers],
                         sum(w.num_preemptions for w in workers), self.affinity_moves, counters)
