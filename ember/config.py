"""The frozen settings every part of ember is configured by.

Resolved and validated once at start-up (`EngineConfig.from_options`); values
found at run time (number of KV blocks, ...) live in `ember.engine.runtime`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

DTYPES = ("auto", "bfloat16", "float16", "float32")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")


@dataclass(frozen=True)
class ModelConfig:
    model: str = field(default="", metadata={"help": "Hugging Face-format model directory."})
    dtype: str = field(
        default="auto", metadata={"help": "Weight/activation dtype: auto|bfloat16|float16|float32."}
    )
    max_model_len: int | None = field(
        default=None, metadata={"help": "Context length; defaults to the model's own."}
    )
    seed: int = field(default=0, metadata={"help": "Seed for unseeded sampling."})
    keep_weights_compressed: bool = field(
        default=False,
        metadata={"help": "With a model written by `ember compress`: keep the decoder layers' "
                          "weights compressed in memory and decode each layer's just before it "
                          "runs (up to a third less weight memory, at a decoding cost per step)."},
    )
    preload_grammar: bool = field(
        default=False,
        metadata={"help": "Load the structured-output grammar compiler in the background at "
                          "start-up (ember serve turns it on), so the first json_schema or "
                          "tools request does not stall the engine loop for seconds."},
    )

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = field(default=16, metadata={"help": "Tokens per KV block."})
    kv_cache_memory: int | None = field(
        default=None,
        metadata={"help": "Bytes of KV cache (default: CPU 1 GiB capped by free memory; "
                          "GPU what gpu_memory_utilization leaves after the weights, at "
                          "most twice what max_num_seqs sequences of max_model_len fill)."},
    )
    kv_cache_dtype: str = field(
        default="auto",
        metadata={"help": "KV cache element type: auto (the model's dtype) or fp8 (= fp8_e4m3) "
                          "or fp8_e5m2: half the bytes per token of a 16-bit cache, stored "
                          "with scale 1 and clamped to the format's range.",
                  "choices": KV_CACHE_DTYPES},
    )
    gpu_memory_utilization: float = field(
        default=0.9, metadata={"help": "Fraction of the GPU's memory for this engine's weights + "
                                         "KV cache."}
    )
    enable_prefix_caching: bool = field(
        default=True,
        metadata={"help": "Reuse the KV of full blocks whose token prefix was computed before "
                          "(automatic prefix caching)."},
    )
    kv_cpu_bytes: int = field(
        default=0,
        metadata={"help": "Bytes of host memory keeping prefix-cache blocks the device evicts "
                          "(0: no CPU tier)."},
    )
    kv_disk_dir: str | None = field(
        default=None,
        metadata={"help": "Directory keeping prefix-cache blocks the CPU tier evicts (kept "
                          "across restarts; no disk tier without it)."},
    )
    kv_disk_bytes: int = field(
        default=4 << 30, metadata={"help": "Bytes the disk tier may use in kv_disk_dir."}
    )
    kv_events_endpoint: str | None = field(
        default=None,
        metadata={"help": "ZeroMQ endpoint to publish KV events on (stored/removed block "
                          "hashes per tier), e.g. tcp://127.0.0.1:5557 (default: off)."},
    )

    def validate(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, "
                             f"got {self.kv_cache_dtype!r}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be > 0 bytes, got {self.kv_cache_memory}")
        for name in ("kv_cpu_bytes", "kv_disk_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 bytes, got {getattr(self, name)}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = field(default=128, metadata={"help": "Most sequences running at once."})
    max_num_batched_tokens: int = field(
        default=2048,
        metadata={"help": "Token budget of one step (prefill chunks + decodes); smaller keeps "
                          "decode latency steadier under long prompts, larger raises throughput."},
    )
    enable_chunked_prefill: bool = field(
        default=True, metadata={"help": "Split long prompts across steps within the budget."}
    )

    def validate(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )


@dataclass(frozen=True)
class DeviceConfig:
    device: str = field(default="auto", metadata={"help": "cpu|cuda|auto."})
    num_threads: int | None = field(
        default=None, metadata={"help": "CPU threads for torch (default: one per core this "
                                        "process may use)."}
    )
    cpu_cores: str | None = field(
        default=None, metadata={"help": "Bind this worker to these CPU cores, e.g. '0-3' or "
                                        "'0,2' (Linux; default: no binding)."}
    )
    enforce_eager: bool = field(
        default=False, metadata={"help": "Disable CUDA-graph capture of decode batches."}
    )

    def validate(self) -> None:
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be cpu, cuda or auto, got {self.device!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        if self.cpu_cores is not None:
            from ember.cpu_cores import parse_cpu_list

            parse_cpu_list(self.cpu_cores)


ROLES = ("both", "prefill", "decode")
KV_SEND_MODES = ("auto", "layerwise", "per-step")
KV_TRANSFER_BACKENDS = ("mooncake", "shm")


@dataclass(frozen=True)
class DisaggConfig:
    role: str = field(
        default="both", metadata={"help": "both (prefill and decode here), prefill (compute "
                                          "prompts, send their KV to decode workers) or decode "
                                          "(take prompts' KV from prefill workers).",
                                  "choices": ROLES}
    )
    kv_transfer_backend: str = field(
        default="mooncake", metadata={"help": "How KV blocks move between workers: mooncake "
                                              "(Mooncake Transfer Engine) or shm (same host).",
                                      "choices": KV_TRANSFER_BACKENDS}
    )
    kv_transfer_protocol: str = field(
        default="tcp", metadata={"help": "Mooncake protocol: tcp, or rdma in clusters."}
    )
    kv_transfer_host: str = field(
        default="127.0.0.1", metadata={"help": "Address peers reach this worker's KV on."}
    )
    kv_send_mode: str = field(
        default="auto", metadata={"help": "Prefill role: when a prompt's KV is written to its "
                                          "decode worker: layerwise (each layer's while later "
                                          "layers compute), per-step (after each step's "
                                          "forward) or auto (layerwise when the KV is on a GPU; "
                                          "per-step on the CPU, where copies take the cores "
                                          "the forward runs on).",
                                  "choices": KV_SEND_MODES}
    )
    kv_reservation_ttl_s: float = field(
        default=30.0, metadata={"help": "Decode role: seconds blocks reserved for a remote "
                                        "prefill stay reserved before they are freed."}
    )

    def validate(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.kv_transfer_backend not in KV_TRANSFER_BACKENDS:
            raise ValueError(f"kv_transfer_backend must be one of {KV_TRANSFER_BACKENDS}, "
                             f"got {self.kv_transfer_backend!r}")
        if self.kv_send_mode not in KV_SEND_MODES:
            raise ValueError(f"kv_send_mode must be one of {KV_SEND_MODES}, got "
                             f"{self.kv_send_mode!r}")
        if self.kv_reservation_ttl_s <= 0:
            raise ValueError(f"kv_reservation_ttl_s must be > 0, got "
                             f"{self.kv_reservation_ttl_s}")


_SECTIONS = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig,
             "device": DeviceConfig, "disagg": DisaggConfig}


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    disagg: DisaggConfig = field(default_factory=DisaggConfig)

    @classmethod
    def from_options(cls, model: str, **options: Any) -> EngineConfig:
        """Build from flat keyword options (`LLM(model, max_num_seqs=8)`); unknown ones raise."""
        by_section: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
        owner = {f.name: name for name, section in _SECTIONS.items() for f in fields(section)}
        for key, value in options.items():
            if key not in owner:
                raise ValueError(f"unknown engine option {key!r}; known: {sorted(owner)}")
            by_section[owner[key]][key] = value
        by_section["model"]["model"] = model
        config = cls(**{name: _SECTIONS[name](**kw) for name, kw in by_section.items()})
        config.validate()
        return config

    def validate(self) -> None:
        for section in (self.model, self.cache, self.scheduler, self.device, self.disagg):
            section.validate()

    def replace(self, **sections: Any) -> EngineConfig:
        return dataclasses.replace(self, **sections)


@dataclass(frozen=True)
class ServerConfig:
    """The HTTP front end of `ember serve` (not part of EngineConfig: the engine never sees it)."""

    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on."})
    port: int = field(default=8000, metadata={"help": "Port to listen on."})
    api_key: str | None = field(
        default=None, metadata={"help": "Require `Authorization: Bearer KEY` on /v1 routes."}
    )
    served_model_name: str | None = field(
        default=None, metadata={"help": "Model id clients send (default: the directory's name)."}
    )
    max_queued_requests: int = field(
        default=512,
        metadata={"help": "Requests waiting for their first token beyond which new ones get "
                          "429 with Retry-After."},
    )
    max_request_bytes: int = field(
        default=16 * 1024 * 1024, metadata={"help": "Largest request body (413 beyond)."}
    )
    shutdown_grace_s: float = field(
        default=30.0, metadata={"help": "On SIGTERM, how long in-flight streams may finish."}
    )

    def validate(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        for name in ("max_queued_requests", "max_request_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.shutdown_grace_s < 0:
            raise ValueError(f"shutdown_grace_s must be >= 0, got {self.shutdown_grace_s}")


@dataclass(frozen=True)
class RouterConfig:
    """`ember router`: the front door of a fleet of `ember serve` workers."""

    workers: tuple[str, ...] = field(
        default=(), metadata={"help": "Worker base URL, e.g. http://127.0.0.1:8001 (repeat)."}
    )
    config: str | None = field(
        default=None, metadata={"help": "A fleet YAML file (`workers:` list and router options); "
                                        "re-read when it changes."}
    )
    model: str | None = field(
        default=None, metadata={"help": "The workers' model directory: its tokenizer gives "
                                        "exact prompt tokens and cache-aware routing."}
    )
    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on."})
    port: int = field(default=8000, metadata={"help": "Port to listen on."})
    api_key: str | None = field(
        default=None, metadata={"help": "Require `Authorization: Bearer KEY` on /v1 and "
                                        "/workers."}
    )
    max_request_bytes: int = field(
        default=16 * 1024 * 1024, metadata={"help": "Largest request body (413 beyond)."}
    )
    health_interval_s: float = field(
        default=2.0, metadata={"help": "Seconds between active health checks of each worker."}
    )
    failure_threshold: int = field(
        default=3, metadata={"help": "Consecutive failures that open a worker's circuit."}
    )
    breaker_s: float = field(
        default=10.0, metadata={"help": "How long an open circuit keeps a worker out."}
    )
    max_attempts: int = field(
        default=3, metadata={"help": "Workers tried for a request that fails before its "
                                     "first byte."}
    )
    routing_policy: str = field(
        default="ember", metadata={
            "help": "ember (the cost function), or a baseline: round_robin, least_requests, "
                    "prefix_tree (SGLang-style prefix tree with a balance threshold).",
            "choices": ("ember", "round_robin", "least_requests", "prefix_tree")}
    )
    session_affinity: bool = field(
        default=True, metadata={"help": "Keep requests with one x-session-affinity header on "
                                        "one worker (within the load bound)."}
    )
    decode_weight: float = field(
        default=0.25, metadata={"help": "Cost of one decode token still to come, in prefill "
                                        "tokens (the routing cost function's weight)."}
    )
    affinity_load_factor: float = field(
        default=1.25, metadata={"help": "A session stays on its worker while that worker's "
                                        "load is within this factor of the fleet's mean."}
    )
    request_timeout_s: float = field(
        default=3600.0, metadata={"help": "Longest a proxied request may take, streamed."}
    )
    min_remote_prefill_tokens: int = field(
        default=256, metadata={"help": "Disaggregated fleets: a request whose prompt has fewer "
                                       "tokens than this uncached on its decode worker is "
                                       "prefilled there."}
    )
    prefill_timeout_s: float = field(
        default=20.0, metadata={"help": "Disaggregated fleets: a prefill worker that has not "
                                        "answered in this long has failed (the decode worker "
                                        "prefills); keep it below the workers' "
                                        "kv_reservation_ttl_s."}
    )
    max_prefill_queue_tokens: int = field(
        default=32768, metadata={"help": "Disaggregated fleets: prompt tokens in flight beyond "
                                         "which a prefill worker counts as saturated (when all "
                                         "are, decode workers prefill)."}
    )

    def validate(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        for name in ("max_attempts", "failure_threshold"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        policies = fields_by_name(RouterConfig)["routing_policy"].metadata["choices"]
        if self.routing_policy not in policies:
            raise ValueError(f"routing_policy must be one of {', '.join(policies)}, "
                             f"got {self.routing_policy!r}")
        for url in self.workers:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"worker URL {url!r} must start with http:// or https://")


def fields_by_name(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in fields(cls)}


def option_fields() -> list[tuple[str, dataclasses.Field]]:
    """Every flat engine option with its field (for the CLI's --help)."""
    return [(f.name, f) for section in _SECTIONS.values() for f in fields(section)]
