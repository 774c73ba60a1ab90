"""CPU attention backend in plain PyTorch: paged KV writes and masked SDPA over gathered blocks.

Vectorised per step: decode tokens form one padded group and prefill chunks another, so
no Python loop runs over sequences inside the forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ember.attention.backend import AttentionBackend, AttentionSpec, BatchLayout


@dataclass
class _Group:
    """Sequences attended together: their queries padded to max_q, their keys to max_k."""

    token_idx: torch.Tensor | None  # [group_tokens] rows of the flat batch; None = all, in order
    pad_idx: torch.Tensor | None  # [group_tokens] row in the padded [num_seqs * max_q] query
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int64, padded with block 0
    q_pos: torch.Tensor  # [num_seqs, max_q, 1] position of each (padded) query
    k_pos: torch.Tensor  # [1, max_k] key positions
    valid: torch.Tensor  # [num_seqs, 1, max_q, max_k] bool: causal and inside the context
    num_seqs: int
    max_q: int
    masks: dict[int, torch.Tensor] = field(default_factory=dict)  # by sliding window

    def mask(self, window: int | None) -> torch.Tensor:
        if window is None:
            return self.valid
        if window not in self.masks:
            in_window = (self.q_pos - self.k_pos) < window  # [num_seqs, max_q, max_k]
            self.masks[window] = self.valid & in_window.unsqueeze(1)
        return self.masks[window]


@dataclass
class TorchMetadata:
    slot_mapping: torch.Tensor  # [num_tokens]
    groups: list[_Group]
    num_tokens: int


def _build_group(layout: BatchLayout, seq_idx: list[int], token_starts: list[int],
                 covers_all: bool, device: torch.device) -> _Group:
    query_lens = [layout.query_lens[s] for s in seq_idx]
    context_lens = [layout.context_lens[s] for s in seq_idx]
    max_q = max(query_lens)
    max_blocks = max(len(layout.block_tables[s]) for s in seq_idx)
    tables = [layout.block_tables[s] + [0] * (max_blocks - len(layout.block_tables[s]))
              for s in seq_idx]
    max_k = max_blocks * layout.block_size

    q_pos_rows, token_idx, pad_idx = [], [], []
    for g, (start, q_len, ctx) in enumerate(zip(token_starts, query_lens, context_lens)):
        first = ctx - q_len
        # Padded query rows repeat the last position so no row is fully masked (no NaNs).
        q_pos_rows.append([first + i for i in range(q_len)] + [ctx - 1] * (max_q - q_len))
        token_idx.extend(range(start, start + q_len))
        pad_idx.extend(range(g * max_q, g * max_q + q_len))

    q_pos = torch.tensor(q_pos_rows, dtype=torch.int64).unsqueeze(-1)  # [S, max_q, 1]
    k_pos = torch.arange(max_k, dtype=torch.int64).unsqueeze(0)  # [1, max_k]
    ctx_t = torch.tensor(context_lens, dtype=torch.int64).view(-1, 1, 1)
    valid = ((k_pos <= q_pos) & (k_pos < ctx_t)).unsqueeze(1)  # [S, 1, max_q, max_k]
    dense = covers_all and max_q == min(query_lens)
    return _Group(
        token_idx=None if covers_all else torch.tensor(token_idx, device=device),
        pad_idx=None if dense else torch.tensor(pad_idx, device=device),
        block_tables=torch.tensor(tables, dtype=torch.int64, device=device),
        q_pos=q_pos.to(device),
        k_pos=k_pos.to(device),
        valid=valid.to(device),
        num_seqs=len(seq_idx),
        max_q=max_q,
    )


class TorchBackend(AttentionBackend):
    name = "torch"

    def build_metadata(self, layout: BatchLayout, device: torch.device) -> TorchMetadata:
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
        return TorchMetadata(layout.slot_mapping.to(device), groups, total)

    def forward(self, q, k, v, kv_cache, metadata: TorchMetadata, spec: AttentionSpec):
        key_cache, value_cache = kv_cache[0], kv_cache[1]  # [num_blocks, block, kv_heads, dim]
        flat_shape = (-1, spec.num_kv_heads, spec.head_dim)
        key_cache.view(flat_shape).index_copy_(0, metadata.slot_mapping, k)
        value_cache.view(flat_shape).index_copy_(0, metadata.slot_mapping, v)
        if len(metadata.groups) == 1:
            return _attend_group(q, key_cache, value_cache, metadata.groups[0], spec)
        out = torch.empty_like(q)
        for group in metadata.groups:
            out[group.token_idx] = _attend_group(q, key_cache, value_cache, group, spec)
        return out


def _attend_group(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                  group: _Group, spec: AttentionSpec) -> torch.Tensor:
    q_group = q if group.token_idx is None else q[group.token_idx]  # [n, heads, dim]
    num_seqs, max_q = group.num_seqs, group.max_q
    if group.pad_idx is None:
        q_pad = q_group.view(num_seqs, max_q, spec.num_heads, spec.head_dim)
    else:
        q_pad = q_group.new_zeros(num_seqs * max_q, spec.num_heads, spec.head_dim)
        q_pad[group.pad_idx] = q_group
        q_pad = q_pad.view(num_seqs, max_q, spec.num_heads, spec.head_dim)
    # [num_seqs, max_blocks, block, kv_heads, dim] -> [num_seqs, kv_heads, max_k, dim]
    keys = key_cache[group.block_tables].flatten(1, 2).transpose(1, 2)
    values = value_cache[group.block_tables].flatten(1, 2).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        q_pad.transpose(1, 2), keys, values, attn_mask=group.mask(spec.sliding_window),
        scale=spec.scale, enable_gqa=spec.num_heads != spec.num_kv_heads,
    )  # [num_seqs, heads, max_q, dim]
    out = out.transpose(1, 2).reshape(num_seqs * max_q, spec.num_heads, spec.head_dim)
    return out if group.pad_idx is None else out[group.pad_idx]
