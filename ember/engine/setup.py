"""Start-up: loads the model, picks device and attention backend, sizes the KV cache.

Runs once; what it finds at run time goes into an `EngineRuntime` record (the config stays frozen).
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch

from ember.attention.backend import AttentionBackend, allocate_kv_pool, kv_bytes_per_block
from ember.attention.kv_dtype import resolve_kv_cache_dtype
from ember.config import EngineConfig
from ember.cpu_cores import available_cores, bind_to_cores, parse_cpu_list
from ember.engine.block_hash import root_hash
from ember.engine.constraint import SamplingConstraint
from ember.engine.cuda_graphs import DecodeGraphs
from ember.engine.kv_cache_manager import KVCacheManager
from ember.engine.runner import ModelRunner
from ember.engine.scheduler import Scheduler
from ember.kv.events import KVEventRecorder
from ember.kv.tiers import KVTiers
from ember.model import panel_gemm
from ember.model.layers import onednn_bf16_supported
from ember.model.loader import ModelInfo, load_model
from ember.structured.manager import StructuredOutputManager

logger = logging.getLogger("ember")

DEFAULT_CPU_KV_BYTES = 1 << 30


@dataclass(frozen=True)
class EngineRuntime:
    device: str
    backend: str
    num_blocks: int
    block_size: int
    max_model_len: int
    kv_cache_bytes: int

    @property
    def num_kv_tokens(self) -> int:
        return self.num_blocks * self.block_size


@dataclass
class EngineParts:
    model_info: ModelInfo
    runtime: EngineRuntime
    scheduler: Scheduler
    runner: ModelRunner
    constraint: SamplingConstraint  # admits requests in the core, masks logits in the runner
    kv_events: KVEventRecorder | None = None  # fed by the block pool and the tiers
    transport: Any = None  # disaggregated roles: moves KV blocks between workers
    kv_layout: Any = None  # where a block's bytes lie in the KV pool (for the transport)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is available")
    return torch.device(name)


def make_backend(device: torch.device, config: EngineConfig,
                 max_model_len: int) -> AttentionBackend:
    if device.type == "cuda":
        from ember.attention.triton_backend import TritonBackend

        sched = config.scheduler
        # Persistent metadata buffers at their maxima, so decode batches can be graph-captured.
        return TritonBackend(
            max_num_seqs=sched.max_num_seqs,
            max_num_tokens=max(sched.max_num_batched_tokens, sched.max_num_seqs),
            max_blocks_per_seq=-(-max_model_len // config.cache.block_size),
        )
    from ember.attention.torch_backend import TorchBackend

    return TorchBackend()


def _kv_budget_bytes(config: EngineConfig, device: torch.device, per_block: int,
                    max_model_len: int) -> int:
    if config.cache.kv_cache_memory is not None:
        return config.cache.kv_cache_memory
    if device.type == "cuda":
        return _gpu_kv_budget_bytes(config, device, per_block, max_model_len)
    return min(DEFAULT_CPU_KV_BYTES, psutil.virtual_memory().available // 4)


def _gpu_kv_budget_bytes(config: EngineConfig, device: torch.device, per_block: int,
                         max_model_len: int) -> int:
    """`gpu_memory_utilization` of the card for this engine (weights + KV), as in vLLM: what
    other processes hold is not charged to it, but must leave room for the KV cache."""
    utilization = config.cache.gpu_memory_utilization
    free, total = torch.cuda.mem_get_info(device)
    budget = int(total * utilization) - torch.cuda.memory_reserved(device)
    # A small model need not take the card: every running sequence at full length, and as
    # much again for cached prefixes.
    max_tokens = 2 * config.scheduler.max_num_seqs * max_model_len
    budget = min(budget, -(-max_tokens // config.cache.block_size) * per_block)
    if budget > free:
        raise ValueError(
            f"gpu_memory_utilization={utilization} leaves {budget / 2**30:.2f} GiB for the KV "
            f"cache but only {free / 2**30:.2f} GiB of {device} is free (other processes hold "
            f"the rest); lower gpu_memory_utilization or set kv_cache_memory")
    return budget


def _graph_safe(model: torch.nn.Module) -> bool:
    """Whether every module can be captured in a CUDA graph (`cuda_graph_safe`, default yes)."""
    unsafe = [type(m).__name__ for m in model.modules()
              if not getattr(m, "cuda_graph_safe", True)]
    if unsafe:
        logger.warning("CUDA graphs off: %s cannot be captured in %s", unsafe[0],
                       next(model.parameters()).dtype)
    return not unsafe


def tune_cpu_allocator() -> None:
    """Keep freed activation buffers in the heap instead of returning them to the OS.

    NOTE: by default glibc mmaps every allocation above 128 KiB-32 MiB and unmaps it on free,
    so each step's temporaries page-fault afresh; that made CPU steps up to several times
    slower. No-op where glibc's mallopt is unavailable.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's maximum
    libc.mallopt(m_trim_threshold, 1 << 30)


ONEDNN_PRIMITIVE_CACHE_CAPACITY = 65536


def _bind_cpu_cores(config: EngineConfig) -> tuple[int, ...]:
    """Bind to the configured cores, if any; returns the cores this process runs on."""
    if config.device.cpu_cores is not None:
        bind_to_cores(parse_cpu_list(config.device.cpu_cores))
    return available_cores()


def keep_gemm_primitives() -> None:
    """Let oneDNN keep a compiled GEMM for every token count a CPU engine's steps meet.

    NOTE: oneDNN keeps 1,024 primitives by default and compiles again on a miss. A step's
    token count changes with its batch (the decodes plus a prompt chunk), every count needs
    its own primitives for each GEMM shape, so the default cache thrashes; a new count costs
    ~4 ms of compiling on the 10m model. oneDNN reads the capacity once, when it makes its
    first primitive: a process that already ran one keeps its setting, and a value the user
    set wins.
    """
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_PRIMITIVE_CACHE_CAPACITY))


def model_cache_root(model_dir: str, dtype: torch.dtype,
                     kv_dtype: torch.dtype | None = None) -> bytes:
    """The prefix cache's root hash: the model's config and dtype (and the KV cache's, when it
    differs), not its path, so the same model on two machines shares block hashes and neither
    another model nor another KV format (in a disk tier, say) ever matches."""
    parts = [str(dtype)] if kv_dtype in (None, dtype) else [str(dtype), f"kv:{kv_dtype}"]
    return root_hash((Path(model_dir) / "config.json").read_bytes(), *parts)


def make_tiers(config: EngineConfig, kv_pool: torch.Tensor, backend: AttentionBackend,
               events: KVEventRecorder | None) -> KVTiers | None:
    """The prefix cache's CPU and disk tiers, when configured."""
    cache = config.cache
    if not cache.enable_prefix_caching or not (cache.kv_cpu_bytes or cache.kv_disk_dir):
        return None
    block_shape = list(kv_pool.shape)
    del block_shape[backend.block_dim + 1]  # one block of every layer
    tiers = KVTiers(tuple(block_shape), kv_pool.dtype, cpu_bytes=cache.kv_cpu_bytes,
                    disk_dir=cache.kv_disk_dir, disk_bytes=cache.kv_disk_bytes, events=events)
    logger.info("KV tiers: CPU %.1f MiB, disk %s", tiers.cpu.capacity_bytes / 2**20,
                f"{cache.kv_disk_dir} ({cache.kv_disk_bytes / 2**20:.0f} MiB)"
                if tiers.disk is not None else "off")
    return tiers


def build_engine_parts(config: EngineConfig) -> EngineParts:
    device = resolve_device(config.device.device)
    torch.manual_seed(config.model.seed)  # unseeded requests draw from the global generator
    if device.type == "cpu":
        tune_cpu_allocator()
        keep_gemm_primitives()
        torch.set_num_threads(config.device.num_threads or len(_bind_cpu_cores(config)))
    model, info = load_model(config.model.model, config.model.dtype, device,
                             keep_weights_compressed=config.model.keep_weights_compressed)
    if device.type == "cpu":
        model.prepack_cpu()
    if device.type == "cpu" and info.dtype == torch.bfloat16 and not onednn_bf16_supported():
        logger.info("this CPU has no oneDNN bf16 GEMMs (they need AVX-512): bf16 weights are "
                    "packed for ember's AVX2 panel GEMM%s", "" if panel_gemm.available() else
                    " (unavailable here: widened to fp32 a slice at a time in each GEMM)")
    max_model_len = config.model.max_model_len or info.max_position_embeddings
    if max_model_len > info.max_position_embeddings:
        raise ValueError(f"max_model_len={max_model_len} exceeds the model's "
                         f"max_position_embeddings={info.max_position_embeddings}")

    block_size = config.cache.block_size
    kv_dtype = resolve_kv_cache_dtype(config.cache.kv_cache_dtype, info.dtype)
    per_block = kv_bytes_per_block(info.num_layers, block_size, info.num_kv_heads,
                                   info.head_dim, kv_dtype)
    budget = _kv_budget_bytes(config, device, per_block, max_model_len)
    num_blocks = budget // per_block
    if num_blocks < 1:
        raise ValueError(f"KV cache budget of {budget} bytes holds no block "
                         f"({per_block} bytes each); raise kv_cache_memory")
    backend = make_backend(device, config, max_model_len)
    kv_pool = _allocate_pool(config, info, kv_dtype, num_blocks, device, backend)
    runtime = EngineRuntime(str(device), backend.name, num_blocks, block_size, max_model_len,
                            num_blocks * per_block)
    logger.info(
        "KV cache: %d blocks x %d tokens = %d tokens (%.1f MiB, %s); fits %.1f sequences of "
        "max_model_len=%d", num_blocks, block_size, runtime.num_kv_tokens,
        runtime.kv_cache_bytes / 2**20, kv_dtype, runtime.num_kv_tokens / max_model_len,
        max_model_len)
    events = KVEventRecorder() if config.cache.kv_events_endpoint else None
    tiers = make_tiers(config, kv_pool, backend, events)
    kv = KVCacheManager(num_blocks, block_size,
                        enable_prefix_caching=config.cache.enable_prefix_caching,
                        cache_root=model_cache_root(config.model.model, info.dtype, kv_dtype),
                        tiers=tiers)
    kv.pool.events = events
    scheduler = Scheduler(config.scheduler, kv, max_model_len)
    graphs = None
    if device.type == "cuda" and not config.device.enforce_eager and _graph_safe(model):
        graphs = DecodeGraphs(model, backend, list(kv_pool.unbind(0)),
                              config.scheduler.max_num_seqs, block_size, device,
                              pool=torch.cuda.graph_pool_handle())
    constraint = StructuredOutputManager(config.model.model, info.vocab_size, info.eos_token_ids)
    if config.model.preload_grammar:
        constraint.grammars.preload_in_background()
    runner = ModelRunner(model, backend, kv_pool, block_size, device, constraint, graphs, tiers)
    transport, layout = make_kv_transport(config, kv_pool, backend)
    return EngineParts(info, runtime, scheduler, runner, constraint, events, transport, layout)


def _allocate_pool(config: EngineConfig, info: ModelInfo, kv_dtype: torch.dtype,
                   num_blocks: int, device: torch.device,
                   backend: AttentionBackend) -> torch.Tensor:
    """The KV pool; in shared memory where same-host peers write KV into it (shm transport)."""
    args = (info.num_layers, num_blocks, config.cache.block_size, info.num_kv_heads,
            info.head_dim, kv_dtype, device, backend)
    if config.disagg.role == "both" or config.disagg.kv_transfer_backend != "shm":
        return allocate_kv_pool(*args)
    if device.type != "cpu":
        raise ValueError("the shm KV transfer backend needs the KV cache in host memory; use "
                         "--kv-transfer-backend mooncake on GPUs")
    from ember.kv.transfer.shm import shared_kv_pool

    shape = (info.num_layers, *backend.kv_cache_shape(num_blocks, config.cache.block_size,
                                                      info.num_kv_heads, info.head_dim))
    return shared_kv_pool(shape, kv_dtype).tensor


def make_kv_transport(config: EngineConfig, kv_pool: torch.Tensor,
                      backend: AttentionBackend) -> tuple[Any, Any]:
    """(transport, block layout) for the prefill and decode roles; (None, None) colocated."""
    disagg = config.disagg
    if disagg.role == "both":
        return None, None
    from ember.kv.transfer import BlockLayout, make_transport

    if disagg.kv_transfer_backend == "mooncake":
        transport = make_transport("mooncake", hostname=disagg.kv_transfer_host,
                                   protocol=disagg.kv_transfer_protocol)
    else:
        transport = make_transport("shm")
    transport.register(kv_pool)
    logger.info("KV transfer: %s, role %s", disagg.kv_transfer_backend, disagg.role)
    return transport, BlockLayout.from_pool(kv_pool, backend.block_dim + 1)
