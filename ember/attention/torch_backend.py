"""CPU attention backend in plain PyTorch: paged KV writes and batched-matmul attention.

Vectorised per step: decode tokens form one padded group and prefill chunks another, so no
Python loop runs over sequences. The cache is head-major ([kv_heads, blocks, block, dim]) so
one gather yields each (head, sequence)'s keys contiguous, ready for a single batched GEMM.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ember.attention.backend import AttentionBackend, AttentionSpec, BatchLayout
from ember.attention.cpu_kernel import kernel_supports, load_kernel, paged_attention, write_kv
from ember.attention.kv_dtype import as_copyable, quantize_kv


@dataclass
class _Group:
    """Sequences attended together: queries padded to max_q, keys to max_blocks blocks."""

    token_idx: torch.Tensor | None  # [group_tokens] rows of the flat batch; None = all, in order
    pad_idx: torch.Tensor | None  # [group_tokens] row in the padded [num_seqs * max_q] queries
    flat_blocks: torch.Tensor  # [num_seqs * max_blocks] block ids, tables padded with block 0
    q_pos: torch.Tensor  # [num_seqs, max_q, 1] position of each (padded) query
    k_pos: torch.Tensor  # [1, 1, max_k] key positions
    valid: torch.Tensor  # [num_seqs, max_q, max_k] causal and inside the context
    num_seqs: int
    max_q: int
    max_k: int
    masks: dict[int | None, torch.Tensor] = field(default_factory=dict)  # by sliding window

    def additive_mask(self, window: int | None) -> torch.Tensor:
        """[num_seqs, max_q, 1, max_k] float32: 0 where attended, -inf elsewhere."""
        if window not in self.masks:
            allowed = self.valid
            if window is not None:
                allowed = allowed & ((self.q_pos - self.k_pos) < window)
            mask = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device)
            self.masks[window] = mask.masked_fill_(~allowed, float("-inf")).unsqueeze(2)
        return self.masks[window]


@dataclass
class KernelMetadata:
    """What the C kernel reads: every sequence of the step, in flat-batch order."""

    block_tables: torch.Tensor  # [num_seqs, max_blocks] int64, padded with block 0
    query_start: torch.Tensor  # [num_seqs + 1] int32
    context_lens: torch.Tensor  # [num_seqs] int32


@dataclass
class TorchMetadata:
    slot_mapping: torch.Tensor  # [num_tokens]
    layout: BatchLayout
    device: torch.device
    kernel: KernelMetadata | None = None
    _groups: list[_Group] | None = None

    @property
    def groups(self) -> list[_Group]:
        """The PyTorch path's padded groups, built on first use (the kernel needs none)."""
        if self._groups is None:
            self._groups = _build_groups(self.layout, self.device)
        return self._groups


def _build_groups(layout: BatchLayout, device: torch.device) -> list[_Group]:
    starts, total = [], 0
    for q_len in layout.query_lens:
        starts.append(total)
        total += q_len
    decode = [s for s, q in enumerate(layout.query_lens) if q == 1]
    prefill = [s for s, q in enumerate(layout.query_lens) if q > 1]
    groups = []
    for seq_idx in (decode, prefill):
        if seq_idx:
            covers_all = len(seq_idx) == len(layout.query_lens)
            groups.append(_build_group(layout, seq_idx, [starts[s] for s in seq_idx],
                                       covers_all, device))
    return groups


def _kernel_metadata(layout: BatchLayout) -> KernelMetadata:
    max_blocks = max(len(t) for t in layout.block_tables)
    tables = [t + [0] * (max_blocks - len(t)) for t in layout.block_tables]
    query_start = [0]
    for q_len in layout.query_lens:
        query_start.append(query_start[-1] + q_len)
    return KernelMetadata(torch.tensor(tables, dtype=torch.int64),
                          torch.tensor(query_start, dtype=torch.int32),
                          torch.tensor(layout.context_lens, dtype=torch.int32))


def _build_group(layout: BatchLayout, seq_idx: list[int], token_starts: list[int],
                 covers_all: bool, device: torch.device) -> _Group:
    query_lens = [layout.query_lens[s] for s in seq_idx]
    context_lens = [layout.context_lens[s] for s in seq_idx]
    max_q = max(query_lens)
    max_blocks = max(len(layout.block_tables[s]) for s in seq_idx)
    flat_blocks: list[int] = []
    for s in seq_idx:
        table = layout.block_tables[s]
        flat_blocks += table
        flat_blocks += [0] * (max_blocks - len(table))
    max_k = max_blocks * layout.block_size

    q_pos_rows, token_idx, pad_idx = [], [], []
    for g, (start, q_len, ctx) in enumerate(zip(token_starts, query_lens, context_lens)):
        first = ctx - q_len
        # Padded query rows repeat the last position so no row is fully masked (no NaNs).
        q_pos_rows.append([first + i for i in range(q_len)] + [ctx - 1] * (max_q - q_len))
        token_idx.extend(range(start, start + q_len))
        pad_idx.extend(range(g * max_q, g * max_q + q_len))

    q_pos = torch.tensor(q_pos_rows, dtype=torch.int64).unsqueeze(-1)  # [S, max_q, 1]
    k_pos = torch.arange(max_k, dtype=torch.int64).view(1, 1, -1)  # [1, 1, max_k]
    ctx_t = torch.tensor(context_lens, dtype=torch.int64).view(-1, 1, 1)
    valid = (k_pos <= q_pos) & (k_pos < ctx_t)  # [S, max_q, max_k]
    dense = covers_all and max_q == min(query_lens)
    return _Group(
        token_idx=None if covers_all else torch.tensor(token_idx, device=device),
        pad_idx=None if dense else torch.tensor(pad_idx, device=device),
        flat_blocks=torch.tensor(flat_blocks, dtype=torch.int64, device=device),
        q_pos=q_pos.to(device),
        k_pos=k_pos.to(device),
        valid=valid.to(device),
        num_seqs=len(seq_idx),
        max_q=max_q,
        max_k=max_k,
    )


class TorchBackend(AttentionBackend):
    name = "torch"
    block_dim = 2  # [2, kv_heads, num_blocks, block_size, head_dim]

    def __init__(self, use_kernel: bool = True) -> None:
        """`use_kernel`: attend with the C kernel (cpu_kernel.py) where it supports the layer;
        the PyTorch path below is the fallback and the reference it is tested against."""
        self._lib = load_kernel() if use_kernel else None
        # NOTE: gathers write into these grow-only buffers: a fresh multi-MB allocation each
        # layer would be mmap'd and page-faulted by glibc every time (several times slower).
        self._key_buffer = torch.empty(0)
        self._value_buffer = torch.empty(0)

    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int,
                       head_dim: int) -> tuple[int, ...]:
        return (2, num_kv_heads, num_blocks, block_size, head_dim)

    def build_metadata(self, layout: BatchLayout, device: torch.device) -> TorchMetadata:
        # The C kernel reads host memory: tensors on a GPU take the PyTorch path.
        use_kernel = self._lib is not None and torch.device(device).type == "cpu"
        kernel = _kernel_metadata(layout) if use_kernel else None
        return TorchMetadata(layout.slot_mapping.to(device), layout, device, kernel)

    def forward(self, q, k, v, kv_cache, metadata: TorchMetadata, spec: AttentionSpec):
        key_cache, value_cache = kv_cache[0], kv_cache[1]  # [kv_heads, blocks, block, dim]
        k, v = quantize_kv(k, key_cache.dtype), quantize_kv(v, value_cache.dtype)
        kernel = metadata.kernel
        if kernel is None or not write_kv(self._lib, k, v, key_cache, value_cache,
                                          metadata.slot_mapping):
            flat_shape = (spec.num_kv_heads, -1, spec.head_dim)
            for cache, new in ((key_cache, k), (value_cache, v)):
                as_copyable(cache).view(flat_shape).index_copy_(
                    1, metadata.slot_mapping, as_copyable(new).transpose(0, 1))
        if kernel is not None and kernel_supports(self._lib, q.dtype, key_cache.dtype,
                                                  spec.num_heads, spec.num_kv_heads,
                                                  spec.head_dim):
            return paged_attention(self._lib, q, key_cache, value_cache, kernel.block_tables,
                                   kernel.query_start, kernel.context_lens, spec.scale,
                                   spec.sliding_window)
        if len(metadata.groups) == 1:
            return self._attend(q, key_cache, value_cache, metadata.groups[0], spec)
        out = torch.empty_like(q)
        for group in metadata.groups:
            out[group.token_idx] = self._attend(q, key_cache, value_cache, group, spec)
        return out

    def _gather(self, cache: torch.Tensor, group: _Group, is_key: bool) -> torch.Tensor:
        """[kv_heads, blocks, block, dim] -> [kv_heads, num_seqs, max_k, dim] (a buffer view)."""
        heads, _, block_size, dim = cache.shape
        shape = (heads, group.flat_blocks.numel(), block_size, dim)
        numel = heads * group.flat_blocks.numel() * block_size * dim
        buffer = self._key_buffer if is_key else self._value_buffer
        if buffer.numel() < numel or buffer.dtype != cache.dtype or buffer.device != cache.device:
            buffer = torch.empty(numel, dtype=cache.dtype, device=cache.device)
            if is_key:
                self._key_buffer = buffer
            else:
                self._value_buffer = buffer
        out = buffer[:numel].view(shape)
        torch.index_select(cache, 1, group.flat_blocks, out=out)
        return out.view(heads, group.num_seqs, group.max_k, dim)

    def _attend(self, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                group: _Group, spec: AttentionSpec) -> torch.Tensor:
        heads, kv_heads, dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        per_kv = heads // kv_heads
        num_seqs, max_q = group.num_seqs, group.max_q
        q_group = q if group.token_idx is None else q[group.token_idx]  # [n, heads, dim]
        if group.pad_idx is not None:
            q_pad = q_group.new_zeros(num_seqs * max_q, heads, dim)
            q_pad[group.pad_idx] = q_group
            q_group = q_pad
        # [S*max_q, heads, dim] -> [kv_heads, S, max_q * per_kv, dim], queries pre-scaled
        q_heads = (q_group.view(num_seqs, max_q, kv_heads, per_kv, dim)
                   .permute(2, 0, 1, 3, 4).reshape(kv_heads, num_seqs, max_q * per_kv, dim))
        q_heads = q_heads * spec.scale
        # [kv_heads, S, max_k, dim], widened where the cache is fp8
        keys = self._gather(key_cache, group, is_key=True).to(q.dtype)
        scores = torch.matmul(q_heads, keys.transpose(-1, -2))  # [kv_heads, S, q*per_kv, max_k]
        scores = scores.float().view(kv_heads, num_seqs, max_q, per_kv, group.max_k)
        scores += group.additive_mask(spec.sliding_window)
        probs = scores.softmax(dim=-1).to(q.dtype)
        values = self._gather(value_cache, group, is_key=False).to(q.dtype)
        out = torch.matmul(probs.view(kv_heads, num_seqs, max_q * per_kv, group.max_k), values)
        # [kv_heads, S, max_q * per_kv, dim] -> [S * max_q, heads, dim]
        out = (out.view(kv_heads, num_seqs, max_q, per_kv, dim).permute(1, 2, 0, 3, 4)
               .reshape(num_seqs * max_q, heads, dim))
        return out if group.pad_idx is None else out[group.pad_idx]
