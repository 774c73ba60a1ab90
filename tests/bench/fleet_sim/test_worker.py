"""The simulated worker against hand-computed steps: chunked prefill, prefix hits, eviction of
the least recently freed block (a sequence's tail first), preemption, no leaked block."""

from __future__ import annotations

from ember.bench.fleet_sim.config import WorkerConfig
from ember.bench.fleet_sim.step_model import StepModel
from ember.bench.fleet_sim.worker import SimSequence, SimWorker

ROOT = b"root"
# 1 s per step, 0.1 s per prefill token, 0.5 s per decode sequence: easy to add up by hand
MODEL = StepModel(1.0, 0.1, 0.0, 0.5, 0.0)


def _worker(num_blocks: int = 6, budget: int = 8, max_num_seqs: int = 4) -> SimWorker:
    cfg = WorkerConfig(kv_tokens=4 * num_blocks, max_num_seqs=max_num_seqs,
                       max_num_batched_tokens=budget)
    return SimWorker("w", cfg, MODEL, block_size=4)


def _seq(request_id: int, prompt: int, max_tokens: int, hashes: list[bytes]) -> SimSequence:
    return SimSequence(request_id, prompt, max_tokens, hashes, ROOT)


def _run(worker: SimWorker, now: float = 0.0) -> tuple[float, list[tuple[int, float, bool]]]:
    """Steps until idle: (end time, [(request id, token time, is_last)])."""
    tokens = []
    while (duration := worker.start_step()) is not None:
        now += duration
        tokens += [(e.seq.request_id, now, e.is_last) for e in worker.finish_step()]
    return now, tokens


def _hashes(name: str, num: int) -> list[bytes]:
    return [f"{name}{i}".encode() for i in range(num)]


def test_chunked_prefill_then_decode_times_add_up():
    worker = _worker()
    worker.add(_seq(0, 10, 2, _hashes("a", 3)))
    end, tokens = _run(worker)
    # 8-token chunk (1.8 s), 2-token chunk + first token (1.2 s), one decode (1.5 s)
    assert tokens == [(0, 3.0, False), (0, 4.5, True)]
    assert end == 4.5
    assert worker.pool.num_free_blocks == worker.pool.num_blocks  # nothing leaked


def test_prefix_hit_and_least_recently_freed_eviction():
    worker = _worker()
    a = _hashes("a", 3)
    worker.add(_seq(0, 10, 2, a))
    _run(worker)  # caches a0, a1; frees a's blocks tail first
    shared = _seq(1, 9, 1, a[:2] + [b"b2"])
    worker.add(shared)
    _, tokens = _run(worker)
    assert shared.num_cached_tokens == 8 and tokens == [(1, 1.1, True)]  # 1 token computed
    worker.add(_seq(2, 16, 1, _hashes("c", 4)))  # fits in the never-cached blocks
    _run(worker)
    assert worker.pool.lookup(b"a0") is not None and worker.pool.lookup(b"a1") is not None
    worker.drain_kv_events()
    worker.add(_seq(3, 4, 1, [b"d0"]))  # one more block: the least recently freed is a1
    _run(worker)
    assert worker.pool.lookup(b"a1") is None
    assert worker.pool.lookup(b"a0") is not None
    assert worker.pool.lookup(b"c0") is not None
    removed = [h for e in worker.drain_kv_events() if e["type"] == "removed"
               for h in e["block_hashes"]]
    assert removed == [b"a1".hex()]
    again = _seq(4, 10, 1, a)
    worker.add(again)
    _run(worker)
    assert again.num_cached_tokens == 4  # only a0 left


def test_preemption_recomputes_and_everything_finishes():
    worker = _worker(num_blocks=4, budget=16)
    seqs = [_seq(i, 6, 6, _hashes(f"s{i}-", 3)) for i in range(2)]
    for seq in seqs:
        worker.add(seq)
    _, tokens = _run(worker)
    assert worker.num_preemptions >= 1
    assert sorted(rid for rid, _, last in tokens if last) == [0, 1]
    assert all(s.num_output_tokens == 6 for s in seqs)
    assert worker.pool.num_free_blocks == worker.pool.num_blocks


def test_admission_stops_at_max_num_seqs():
    worker = _worker(num_blocks=20, budget=64, max_num_seqs=2)
    for i in range(3):
        worker.add(_seq(i, 4, 3, _hashes(f"q{i}-", 1)))
    worker.start_step()
    assert len(worker.running) == 2 and len(worker.waiting) == 1


def test_no_prefix_caching_never_hits():
    cfg = WorkerConfig(kv_tokens=64, max_num_batched_tokens=8, enable_prefix_caching=False)
    worker = SimWorker("w", cfg, MODEL, block_size=4)
    for i in range(2):
        seq = _seq(i, 8, 1, _hashes("same", 2))
        worker.add(seq)
        _run(worker)
        assert seq.num_cached_tokens == 0
