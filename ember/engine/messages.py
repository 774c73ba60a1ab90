"""Everything that crosses the engine-core process boundary: plain, msgpack-serialisable shapes.

Versioned by shape: a field added here is added with a default.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass, field
from typing import Any

import msgpack

from ember.engine.sampling_params import SamplingParams

# One sampled token's logprob info: (logprob, rank, [(token_id, logprob), ...]).
TokenLogprob = tuple[float, int, list[tuple[int, float]]]


@dataclass
class EngineCoreRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    # Disaggregated serving (see ember.engine.remote_prefill / kv_sender): on a prefill worker
    # {"do_remote_decode": True, "peer", "block_ids", "first_block"}, the decode worker's
    # reserved blocks; on a decode worker {"transfer_id", "first_token_ids"} to adopt.
    kv_transfer: dict[str, Any] | None = None

    def to_wire(self) -> dict[str, Any]:
        params = {f.name: getattr(self.params, f.name) for f in dataclasses.fields(self.params)}
        return {"request_id": self.request_id, "prompt_token_ids": self.prompt_token_ids,
                "params": params, "arrival_time": self.arrival_time,
                "kv_transfer": self.kv_transfer}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> EngineCoreRequest:
        return cls(data["request_id"], list(data["prompt_token_ids"]),
                   SamplingParams(**data["params"]), data["arrival_time"],
                   data.get("kv_transfer"))


@dataclass
class EngineCoreOutput:
    """New tokens of one sequence in one step, and whether it finished."""

    request_id: str
    seq_index: int
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list[TokenLogprob] | None = None
    # Prompt logprobs scored this step: (logprobs, ranks, tops) for consecutive prompt tokens.
    prompt_logprobs: tuple[list[float], list[int], list[list[tuple[int, float]]]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None  # the request was refused (bad input); nothing else is set
    num_cached_tokens: int = 0  # prompt tokens the prefix cache supplied

    def to_wire(self) -> tuple[Any, ...]:
        return _output_fields(self)  # on the hot path: 64 outputs cost ~20 us, not ~100

    @classmethod
    def from_wire(cls, data: list[Any]) -> EngineCoreOutput:
        return cls(*data)


_output_fields = operator.attrgetter(*(f.name for f in dataclasses.fields(EngineCoreOutput)))


# ---- the envelope --------------------------------------------------------------------------
# Every message is one msgpack frame `[kind, payload]`; no pickle crosses the boundary.


class ClientMsg:
    """Kinds the client sends the core, with their payloads."""

    ADD = "add"  # EngineCoreRequest.to_wire()
    ABORT = "abort"  # [request_id, ...]
    STOP = "stop"  # [[request_id, seq_index, stop_str], ...]: stop strings the front end found
    GET_STATS = "get_stats"  # None; answered by one CoreMsg.STATS, in order
    GET_KV_SNAPSHOT = "get_kv_snapshot"  # None; answered by one CoreMsg.KV_SNAPSHOT, in order
    RESERVE_KV = "reserve_kv"  # [transfer_id, prompt_token_ids]; one CoreMsg.KV_RESERVED
    RELEASE_KV = "release_kv"  # transfer_id
    SHUTDOWN = "shutdown"  # None


class CoreMsg:
    """Kinds the core sends the client, with their payloads."""

    READY = "ready"  # EngineCoreReady.to_wire(): the model is loaded, requests are welcome
    START_FAILED = "start_failed"  # {"error_type", "message"}: the engine could not be built
    OUTPUTS = "outputs"  # [EngineCoreOutput.to_wire(), ...]: one step's outputs and refusals
    STATS = "stats"  # EngineCoreStats.to_wire()
    KV_SNAPSHOT = "kv_snapshot"  # EngineCore.kv_snapshot(): block hashes held, by tier
    KV_RESERVED = "kv_reserved"  # EngineCore.reserve_kv()'s reply, or {"error", "no_room"}
    FAILURE = "failure"  # EngineCoreFailure.to_wire()


def encode_msg(kind: str, payload: Any = None) -> bytes:
    return msgpack.packb([kind, payload], use_bin_type=True)


def decode_msg(data: bytes | memoryview) -> tuple[str, Any]:
    kind, payload = msgpack.unpackb(data, raw=False)
    return kind, payload


def _wire_value(value: Any) -> Any:
    """Plain msgpack values pass; anything else (a torch dtype, a path) travels as its str."""
    if value is None or isinstance(value, (bool, int, float, str, list, tuple, dict)):
        return value
    return str(value)


def wire_dict(obj: Any) -> dict[str, Any]:
    """A dataclass instance as a msgpack-serialisable dict (for start-up records)."""
    if obj is None:
        return {}
    return {f.name: _wire_value(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


@dataclass
class EngineCoreReady:
    """The handshake: what the loaded model and the sized KV cache turned out to be."""

    model_info: dict[str, Any]  # ModelInfo's fields (vocab_size, eos_token_ids, dtype, ...)
    runtime: dict[str, Any]  # EngineRuntime's fields (device, backend, num_blocks, ...)
    pid: int

    def to_wire(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> EngineCoreReady:
        return cls(**data)


@dataclass
class EngineCoreStats:
    """Scheduler and KV counters at one moment (for tests and /metrics)."""

    num_running: int = 0  # sequences
    num_waiting: int = 0  # sequences
    num_requests: int = 0  # unfinished requests
    num_blocks: int = 0
    num_free_blocks: int = 0
    kv_usage: float = 0.0  # fraction of blocks in use
    num_preemptions: int = 0  # since start-up
    num_steps: int = 0  # non-empty steps since start-up
    num_generated_tokens: int = 0  # since start-up
    num_pending_prefill_tokens: int = 0  # prompt tokens not yet computed
    num_pending_decode_tokens: int = 0  # tokens still to generate, at most
    kv_transfer_bytes: int = 0  # prefill role: KV written to decode workers since start-up
    kv_transfer_seconds: float = 0.0  # ... and the time those writes took
    kv_transfer_cpu_seconds: float = 0.0  # ... of it, the writing threads' CPU time
    kv_transfer_wait_seconds: float = 0.0  # ... of it, the engine loop waited after forwards
    kv_transfer_segments: int = 0  # ... in this many contiguous pieces
    kv_transfer_connect_seconds: float = 0.0  # one-time set-up per decode peer

    def to_wire(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> EngineCoreStats:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class EngineCoreFailure:
    """`step()` raised: these requests were aborted; the core serves on unless `is_fatal`."""

    error: str
    request_ids: list[str] = field(default_factory=list)
    is_fatal: bool = False  # the core could not recover and is exiting

    def to_wire(self) -> list[Any]:
        return [self.error, self.request_ids, self.is_fatal]

    @classmethod
    def from_wire(cls, data: list[Any]) -> EngineCoreFailure:
        return cls(*data)
