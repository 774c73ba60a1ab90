"""The per-step forward context: attention metadata and KV caches, entered once per forward.

Attention layers read it instead of threading metadata through every module call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ember.attention.backend import AttentionBackend


@dataclass
class ForwardContext:
    backend: AttentionBackend
    metadata: object
    kv_caches: list[torch.Tensor]  # per layer [2, num_blocks, block_size, kv_heads, head_dim]
    # Called with a layer's index once its KV is written (a prefill worker starts sending it
    # while later layers compute). Not called inside captured CUDA graphs.
    after_layer: Callable[[int], None] | None = None


_current: ForwardContext | None = None


@contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    global _current
    previous, _current = _current, ctx
    try:
        yield ctx
    finally:
        _current = previous


def get_forward_context() -> ForwardContext:
    if _current is None:
        raise RuntimeError("attention called outside forward_context()")
    return _current


def layer_hook() -> Callable[[int], None] | None:
    """The current forward's after-layer hook, if any (None outside a forward)."""
    return _current.after_layer if _current is not None else None
