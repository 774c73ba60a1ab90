"""The frozen settings of a fleet simulation: the trace, each worker, and the sweep.

Only cli.py fills them from argv; every other module receives them.
"""

from __future__ import annotations

from dataclasses import dataclass

# Policies compared: (id, router policy name, whether requests carry x-session-affinity).
POLICY_SPECS: dict[str, tuple[str, bool]] = {
    "round_robin": ("round_robin", False),
    "least_requests": ("least_requests", False),
    "prefix_tree": ("prefix_tree", False),
    "ember_no_header": ("ember", False),
    "ember_header": ("ember", True),
}


@dataclass(frozen=True)
class TraceConfig:
    """Multi-turn agent sessions, as `ember bench serve --dataset sessions` builds them, in
    token space: every session starts with the same system prompt; each turn appends new input
    tokens (a user message or a tool result) to the history, and its answer joins the history
    of the next turn."""

    num_sessions: int = 1000
    turns: int = 8
    system_prompt_len: int = 4000
    input_len: int = 256  # new tokens per turn
    output_len: int = 128  # max_tokens per turn (all generated: ignore_eos)
    range_ratio: float = 0.5  # lengths uniform in [len*(1-r), len*(1+r)]
    think_time_s: float = 1.0  # mean of the exponential pause between an answer and the next turn
    block_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [(self.num_sessions >= 1, "num_sessions must be >= 1"),
                  (self.turns >= 1, "turns must be >= 1"),
                  (self.system_prompt_len >= 0, "system_prompt_len must be >= 0"),
                  (self.input_len >= 1 and self.output_len >= 1,
                   "input_len and output_len must be >= 1"),
                  (0.0 <= self.range_ratio < 1.0, "range_ratio must be in [0, 1)"),
                  (self.think_time_s >= 0.0, "think_time_s must be >= 0"),
                  (self.block_size >= 1, "block_size must be >= 1")]
        _check(checks)


@dataclass(frozen=True)
class WorkerConfig:
    """One simulated `ember serve`: the engine's batching limits and its KV cache."""

    kv_tokens: int = 1 << 19  # KV cache capacity (1 GiB of the 10m model's 2 KiB per token)
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        _check([(self.kv_tokens >= 1, "kv_tokens must be >= 1"),
                (self.max_num_seqs >= 1, "max_num_seqs must be >= 1"),
                (self.max_num_batched_tokens >= 1, "max_num_batched_tokens must be >= 1")])


@dataclass(frozen=True)
class SweepConfig:
    fleet_sizes: tuple[int, ...] = (16, 64)
    loads: tuple[float, ...] = (0.5, 0.8, 1.0)  # fractions of the fleet's capacity (capacity.py)
    policies: tuple[str, ...] = tuple(POLICY_SPECS)
    sessions_per_worker: int = 40  # the trace has this many sessions per worker
    decode_weight: float = 0.25  # ember's cost function
    capacity_requests: int = 1500  # requests in the one-worker saturation run
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [p for p in self.policies if p not in POLICY_SPECS]
        _check([(not unknown, f"unknown policies {unknown}; known: {list(POLICY_SPECS)}"),
                (all(n >= 1 for n in self.fleet_sizes), "fleet sizes must be >= 1"),
                (all(x > 0 for x in self.loads), "loads must be > 0"),
                (self.sessions_per_worker >= 1, "sessions_per_worker must be >= 1")])


def _check(checks: list[tuple[bool, str]]) -> None:
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
