"""The token-space trace: prefix-stable histories, a shared system prompt, the workers' hashes."""

from __future__ import annotations

from ember.bench.fleet_sim.config import TraceConfig
from ember.bench.fleet_sim.workload import Trace, prompt_lens

CFG = TraceConfig(num_sessions=5, turns=4, system_prompt_len=100, input_len=20, output_len=10,
                  think_time_s=2.0)


def test_prompts_grow_by_the_previous_answer_and_the_new_input():
    trace = Trace(CFG)
    session = trace.session(1)
    assert session.prompt_lens == prompt_lens(100, session.turns)
    for prev, turn, cur in zip(session.turns, session.turns[1:], session.prompt_lens[1:]):
        assert cur == session.prompt_lens[session.turns.index(prev)] + prev.max_tokens \
            + turn.num_input_tokens
    assert session.turns[0].think_s == 0.0 and all(t.think_s > 0 for t in session.turns[1:])
    total = session.prompt_lens[-1] + session.turns[-1].max_tokens
    assert len(session.block_hashes) == total // CFG.block_size


def test_sessions_share_exactly_the_system_prompt_blocks():
    trace = Trace(CFG)
    a, b = trace.session(0), trace.session(1)
    num_system = CFG.system_prompt_len // CFG.block_size
    assert a.block_hashes[:num_system] == b.block_hashes[:num_system]
    assert a.block_hashes[num_system] != b.block_hashes[num_system]
    assert a.hex_hashes == [h.hex() for h in a.block_hashes]


def test_same_seed_same_trace_other_seed_other_tokens():
    a, b = Trace(CFG).session(3), Trace(CFG).session(3)
    assert a == b
    other = Trace(TraceConfig(**{**CFG.__dict__, "seed": 1})).session(3)
    assert other.block_hashes[0] != a.block_hashes[0]


def test_session_starts_are_poisson_and_seeded():
    starts = Trace(CFG).session_starts(2.0)
    assert starts[0] == 0.0 and starts == sorted(starts) and len(starts) == CFG.num_sessions
    assert starts == Trace(CFG).session_starts(2.0)
