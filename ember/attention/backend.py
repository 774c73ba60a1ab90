"""The attention-backend contract: one small interface every backend (CPU, Triton) implements.

A backend owns how paged K/V are written and read; it must not know about requests,
the scheduler or sampling. Shapes follow the flat token layout of one step.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class BatchLayout:
    """Host-side description of one step's tokens, built once per step by the runner.

    Sequences appear in the order of the flat token batch; sequence `s` owns tokens
    `query_start_loc[s]:query_start_loc[s+1]`, whose positions are
    `context_lens[s] - query_lens[s] ... context_lens[s] - 1`.
    """

    query_lens: list[int]  # [num_seqs] new tokens computed this step
    context_lens: list[int]  # [num_seqs] tokens in the KV cache after this step
    block_tables: list[list[int]]  # [num_seqs][num_blocks_of_seq]
    slot_mapping: torch.Tensor  # [num_tokens] int64: block_id * block_size + offset
    block_size: int


@dataclass(frozen=True)
class AttentionSpec:
    """Per-layer constants an attention call needs."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    sliding_window: int | None = None  # keys with pos <= q_pos - window are masked


def default_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int,
                           head_dim: int) -> tuple[int, ...]:
    return (2, num_blocks, block_size, num_kv_heads, head_dim)


class AttentionBackend(ABC):
    """Paged attention over one KV cache tensor per layer, laid out as the backend chooses.

    The default layout is [2, num_blocks, block_size, kv_heads, head_dim]; a backend that
    prefers another overrides `kv_cache_shape` and `block_dim` (the block axis of that shape).
    """

    name: str = "abstract"
    block_dim: int = 1

    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int,
                       head_dim: int) -> tuple[int, ...]:
        return default_kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim)

    @abstractmethod
    def build_metadata(self, layout: BatchLayout, device: torch.device) -> object:
        """Turn a step's layout into whatever tensors `forward` needs; called once per step."""

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # this layer's cache, shaped by kv_cache_shape()
        metadata: object,
        spec: AttentionSpec,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """Write this step's k/v into their slots, then attend causally over each context."""


def allocate_kv_cache(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    backend: AttentionBackend | None = None,
) -> list[torch.Tensor]:
    """One allocation for all layers, shaped by `backend` (default layout without one)."""
    return list(allocate_kv_pool(num_layers, num_blocks, block_size, num_kv_heads, head_dim,
                                 dtype, device, backend).unbind(0))


def allocate_kv_pool(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    backend: AttentionBackend | None = None,
) -> torch.Tensor:
    """[num_layers, *backend.kv_cache_shape(...)] zeros (the default layout without one)."""
    shape_of = backend.kv_cache_shape if backend is not None else default_kv_cache_shape
    shape = shape_of(num_blocks, block_size, num_kv_heads, head_dim)
    return torch.zeros((num_layers, *shape), dtype=dtype, device=device)


def kv_bytes_per_block(
    num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return num_layers * 2 * block_size * num_kv_heads * head_dim * element
