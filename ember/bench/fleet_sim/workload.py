"""The simulated trace in token space: sessions that share a system prompt and grow a history,
their seeded token ids, and the chained block hashes ember's workers would compute for them.

Sessions are built on demand (deterministic per seed and session index) so a long trace never
holds every session's hashes at once. Tool-result turns and user turns have the same shape
in token space, so they are not told apart here.
"""

from __future__ import annotations

import random
from array import array
from dataclasses import dataclass
from itertools import accumulate

from ember.bench.fleet_sim.config import TraceConfig
from ember.bench.serve.datasets import sample_len
from ember.bench.serve.loadgen import arrival_times
from ember.engine.block_hash import BlockHash, extend_block_hashes, root_hash

CACHE_ROOT = root_hash("ember-fleet-sim")  # the workers' shared root: one model, one dtype


@dataclass(frozen=True)
class TurnSpec:
    num_input_tokens: int
    max_tokens: int
    think_s: float  # pause between the previous answer and this turn (0 for the first)


@dataclass(frozen=True)
class SimSession:
    session_idx: int
    turns: list[TurnSpec]
    prompt_lens: list[int]  # prompt tokens of each turn: system + history + new input
    block_hashes: list[BlockHash]  # every full block of the whole stream, answers included
    hex_hashes: list[str]  # the same, as the router sees them

    @property
    def session_id(self) -> str:
        return f"session-{self.session_idx}"

    def num_prompt_blocks(self, turn_idx: int, block_size: int) -> int:
        return self.prompt_lens[turn_idx] // block_size


def _tokens(rng: random.Random, num: int) -> array:
    return array("H", rng.randbytes(2 * num))


class Trace:
    """`TraceConfig.num_sessions` sessions; `session(idx)` builds one."""

    def __init__(self, cfg: TraceConfig) -> None:
        self.cfg = cfg
        self._system = _tokens(random.Random(f"{cfg.seed}-system"), cfg.system_prompt_len)
        self._system_hashes: list[BlockHash] = []
        extend_block_hashes(self._system_hashes, CACHE_ROOT, self._system, cfg.block_size,
                            cfg.system_prompt_len // cfg.block_size)
        self._system_hex = [h.hex() for h in self._system_hashes]

    def __len__(self) -> int:
        return self.cfg.num_sessions

    def turn_specs(self, session_idx: int) -> list[TurnSpec]:
        cfg = self.cfg
        rng = random.Random(f"{cfg.seed}-lengths-{session_idx}")
        turns = []
        for t in range(cfg.turns):
            num_input = sample_len(rng, cfg.input_len, cfg.range_ratio)
            max_tokens = sample_len(rng, cfg.output_len, cfg.range_ratio)
            think = rng.expovariate(1.0 / cfg.think_time_s) if t and cfg.think_time_s else 0.0
            turns.append(TurnSpec(num_input, max_tokens, think))
        return turns

    def session(self, session_idx: int) -> SimSession:
        cfg = self.cfg
        turns = self.turn_specs(session_idx)
        rng = random.Random(f"{cfg.seed}-session-{session_idx}")
        stream = array("H", self._system)
        for turn in turns:
            stream += _tokens(rng, turn.num_input_tokens + turn.max_tokens)
        hashes = list(self._system_hashes)
        extend_block_hashes(hashes, CACHE_ROOT, stream, cfg.block_size,
                            len(stream) // cfg.block_size)
        hex_hashes = self._system_hex + [h.hex() for h in hashes[len(self._system_hashes):]]
        return SimSession(session_idx, turns, prompt_lens(cfg.system_prompt_len, turns),
                          hashes, hex_hashes)

    def session_starts(self, sessions_per_s: float) -> list[float]:
        """Poisson session starts (as `ember bench serve` sends sessions), first at 0."""
        return arrival_times(sessions_per_s, self.cfg.num_sessions, self.cfg.seed)

    def mean_turn(self, num_sessions: int = 200) -> tuple[float, float]:
        """(mean prompt tokens, mean max_tokens) per request over the first sessions."""
        prompts, outputs = [], []
        for idx in range(min(num_sessions, self.cfg.num_sessions)):
            turns = self.turn_specs(idx)
            prompts += prompt_lens(self.cfg.system_prompt_len, turns)
            outputs += [t.max_tokens for t in turns]
        return sum(prompts) / len(prompts), sum(outputs) / len(outputs)


def prompt_lens(system_prompt_len: int, turns: list[TurnSpec]) -> list[int]:
    """Turn t's prompt: the system prompt, every earlier turn's input and answer, its input."""
    grown = accumulate((t.num_input_tokens + t.max_tokens for t in turns), initial=0)
    return [system_prompt_len + before + turn.num_input_tokens
            for before, turn in zip(grown, turns)]
