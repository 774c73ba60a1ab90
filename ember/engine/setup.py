"""Start-up: loads the model, picks device and attention backend, sizes the KV cache.

Runs once; what it finds at run time goes into an `EngineRuntime` record (the config stays frozen).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import psutil
import torch

from ember.attention.backend import AttentionBackend, kv_bytes_per_block
from ember.config import EngineConfig
from ember.engine.kv_cache_manager import KVCacheManager
from ember.engine.runner import ModelRunner
from ember.engine.scheduler import Scheduler
from ember.model.loader import ModelInfo, load_model

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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is available")
    return torch.device(name)


def make_backend(device: torch.device, config: EngineConfig) -> AttentionBackend:
    if device.type == "cuda":
        from ember.attention.triton_backend import TritonBackend

        return TritonBackend()
    from ember.attention.torch_backend import TorchBackend

    return TorchBackend()


def _kv_budget_bytes(config: EngineConfig, device: torch.device) -> int:
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used = total - free
        return int(total * config.cache.gpu_memory_utilization) - used
    if config.cache.kv_cache_memory is not None:
        return config.cache.kv_cache_memory
    return min(DEFAULT_CPU_KV_BYTES, psutil.virtual_memory().available // 4)


def build_engine_parts(config: EngineConfig) -> EngineParts:
    device = resolve_device(config.device.device)
    if device.type == "cpu":
        torch.set_num_threads(config.device.num_threads or os.cpu_count() or 1)
    model, info = load_model(config.model.model, config.model.dtype, device)
    max_model_len = config.model.max_model_len or info.max_position_embeddings
    if max_model_len > info.max_position_embeddings:
        raise ValueError(f"max_model_len={max_model_len} exceeds the model's "
                         f"max_position_embeddings={info.max_position_embeddings}")

    block_size = config.cache.block_size
    per_block = kv_bytes_per_block(info.num_layers, block_size, info.num_kv_heads,
                                   info.head_dim, info.dtype)
    budget = _kv_budget_bytes(config, device)
    num_blocks = budget // per_block
    if num_blocks < 1:
        raise ValueError(f"KV cache budget of {budget} bytes holds no block "
                         f"({per_block} bytes each); raise kv_cache_memory")
    kv_pool = torch.zeros((info.num_layers, 2, num_blocks, block_size, info.num_kv_heads,
                           info.head_dim), dtype=info.dtype, device=device)
    backend = make_backend(device, config)
    runtime = EngineRuntime(str(device), backend.name, num_blocks, block_size, max_model_len,
                            num_blocks * per_block)
    logger.info(
        "KV cache: %d blocks x %d tokens = %d tokens (%.1f MiB, %s); fits %.1f sequences of "
        "max_model_len=%d", num_blocks, block_size, runtime.num_kv_tokens,
        runtime.kv_cache_bytes / 2**20, info.dtype, runtime.num_kv_tokens / max_model_len,
        max_model_len)
    scheduler = Scheduler(config.scheduler, KVCacheManager(num_blocks, block_size), max_model_len)
    runner = ModelRunner(model, backend, kv_pool, block_size, device)
    return EngineParts(info, runtime, scheduler, runner)
