"""CUDA-graph capture and replay of decode-only batches (GPU only).

A decode step of n sequences replays the graph captured for the smallest batch size >= n;
inputs go through static buffers and the attention backend's persistent metadata buffers,
whose padding rows are inert (see TritonBackend). It must not capture prefill steps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import torch

from ember.attention.backend import AttentionBackend, BatchLayout
from ember.attention.context import ForwardContext, forward_context

logger = logging.getLogger(__name__)


class Graph(Protocol):
    """What a captured graph offers: replay the recorded work on the same buffers."""

    def replay(self) -> None: ...


def capture_cuda_graph(fn: Callable[[], torch.Tensor], pool: object) -> tuple[Graph, torch.Tensor]:
    """Record `fn` once into a CUDA graph; returns the graph and its static output."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


def capture_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to max_batch (and max_batch itself)."""
    sizes = [s for s in (1, 2, 4, 8) if s <= max_batch]
    sizes += list(range(16, max_batch + 1, 16))
    if max_batch not in sizes:
        sizes.append(max_batch)
    return sizes


class DecodeGraphs:
    def __init__(
        self,
        model: torch.nn.Module,
        backend: AttentionBackend,
        kv_caches: list[torch.Tensor],
        max_batch: int,
        block_size: int,
        device: torch.device,
        capture: Callable[[Callable[[], torch.Tensor], object], tuple[Graph, torch.Tensor]]
        = capture_cuda_graph,
        pool: object = None,
    ) -> None:
        self.sizes = capture_sizes(max_batch)
        self.input_ids = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self._graphs: dict[int, tuple[Graph, torch.Tensor]] = {}
        for size in reversed(self.sizes):  # largest first: smaller ones reuse its memory pool
            # A dummy step of `size` decodes whose KV writes are dropped (slot -1).
            layout = BatchLayout([1] * size, [1] * size, [[0]] * size,
                                 torch.full((size,), -1, dtype=torch.int64), block_size)
            metadata = backend.build_metadata(layout, device)
            ids, pos = self.input_ids[:size], self.positions[:size]

            def run(ids=ids, pos=pos, metadata=metadata) -> torch.Tensor:
                with forward_context(ForwardContext(backend, metadata, kv_caches)):
                    return model(ids, pos)

            run()  # warm-up: triton compiles outside the capture
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self._graphs[size] = capture(run, pool)
        logger.info("captured decode graphs for batch sizes %s", self.sizes)

    def padded_size(self, num_seqs: int) -> int | None:
        for size in self.sizes:
            if size >= num_seqs:
                return size
        return None

    def can_run(self, layout: BatchLayout) -> bool:
        return (self.padded_size(len(layout.query_lens)) is not None
                and all(q == 1 for q in layout.query_lens))

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Replay for a decode step whose metadata was just built; returns hidden [n, hidden]."""
        num = input_ids.shape[0]
        size = self.padded_size(num)
        self.input_ids[:num].copy_(input_ids, non_blocking=True)
        self.positions[:num].copy_(positions, non_blocking=True)
        graph, out = self._graphs[size]
        graph.replay()
        return out[:num]
