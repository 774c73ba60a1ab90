"""Triton kernels for paged attention: write k/v rows into cache slots, attend over paged blocks.

Kernels and their launch wrappers only; metadata and per-step checks live in triton_backend.py.
Importing this imports triton: to run on CPU tensors, set TRITON_INTERPRET=1 before the import.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

# Kernels decorated under TRITON_INTERPRET=1 run in triton's numpy interpreter, which stores
# bfloat16 as raw uint16: arithmetic on bf16 values and fp32->bf16 casts are wrong there, so
# the interpreted kernels upcast before any maths and round their bf16 output by hand.
# NOTE: the test pin is triton 3.8.0: 3.6's interpreter cannot take tensor loop bounds
# (`range(lo, hi)`) under numpy 2.x.


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@triton.jit
def write_kv_kernel(
    k_ptr,  # [num_tokens, num_kv_heads, head_dim]
    v_ptr,  # [num_tokens, num_kv_heads, head_dim]
    key_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim], same strides
    slot_mapping_ptr,  # [num_tokens] int64: block_id * block_size + offset; < 0 = skip
    block_size,
    stride_k_tok,
    stride_k_head,
    stride_v_tok,
    stride_v_head,
    stride_c_block,
    stride_c_slot,
    stride_c_head,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEADS_P2: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
):
    """One program per token: copy its [kv_heads, head_dim] k and v rows into their slot."""
    token_idx = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token_idx).to(tl.int64)
    if slot < 0:  # NOTE: padding tokens of a replayed CUDA graph carry slot -1
        return
    block_idx = slot // block_size
    block_offset = slot % block_size
    heads = tl.arange(0, HEADS_P2)
    dims = tl.arange(0, HEAD_DIM_P2)
    mask = (heads[:, None] < NUM_KV_HEADS) & (dims[None, :] < HEAD_DIM)  # [HEADS_P2, HEAD_DIM_P2]
    dst = block_idx * stride_c_block + block_offset * stride_c_slot
    dst_offs = dst + heads[:, None] * stride_c_head + dims[None, :]
    k = tl.load(k_ptr + token_idx * stride_k_tok + heads[:, None] * stride_k_head + dims[None, :],
                mask=mask)
    tl.store(key_cache_ptr + dst_offs, k, mask=mask)
    v = tl.load(v_ptr + token_idx * stride_v_tok + heads[:, None] * stride_v_head + dims[None, :],
                mask=mask)
    tl.store(value_cache_ptr + dst_offs, v, mask=mask)


@triton.jit
def _find_seq_idx(query_start_loc_ptr, tile_idx, num_seqs, BLOCK_Q: tl.constexpr):
    """The last sequence s whose first tile, query_start_loc[s] // BLOCK_Q + s, is <= tile_idx.

    Sequence s owns tiles [first(s), first(s+1)), at least cdiv(query_len_s, BLOCK_Q) of them,
    so the grid needs only num_tokens // BLOCK_Q + num_seqs tiles and no host-side max.
    """
    lo: tl.int32 = 0
    hi: tl.int32 = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_tile <= tile_idx:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _round_to_output(x, out_ptr, MANUAL_BF16: tl.constexpr):
    """fp32 -> the output element type with round-to-nearest-even."""
    if MANUAL_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(out_ptr.dtype.element_ty)


@triton.jit
def paged_attention_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim]
    q_ptr,  # [num_tokens, num_heads, head_dim]
    key_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim], same strides
    query_start_loc_ptr,  # [num_seqs + 1] int32
    seq_lens_ptr,  # [num_seqs] int32: tokens in the cache after this step
    block_tables_ptr,  # [num_seqs, max_blocks] int32
    split_acc_ptr,  # [num_tokens, num_heads, NUM_SPLITS, HEAD_DIM_P2] fp32 (NUM_SPLITS > 1)
    split_max_ptr,  # [num_tokens, num_heads, NUM_SPLITS] fp32 running max, log2 units
    split_sum_ptr,  # [num_tokens, num_heads, NUM_SPLITS] fp32 softmax denominator
    scale,
    window,  # keys with pos <= q_pos - window are masked (when HAS_WINDOW)
    num_seqs,
    block_size,
    stride_q_tok,
    stride_q_head,
    stride_o_tok,
    stride_o_head,
    stride_c_block,
    stride_c_slot,
    stride_c_head,
    stride_bt_seq,
    GROUP: tl.constexpr,  # query heads per kv head
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
    BLOCK_M: tl.constexpr,  # tile rows: BLOCK_Q queries x GROUP heads, padded to a power of 2
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,  # keys per inner step
    NUM_SPLITS: tl.constexpr,  # > 1: split-K, each program writes a partial for the reduce
    HAS_WINDOW: tl.constexpr,
    DOT_F32: tl.constexpr,  # dot products on fp32 operands (fp32 inputs, or the interpreter)
    MANUAL_BF16: tl.constexpr,
    KV_FP8: tl.constexpr,  # the cache holds fp8: widened to the queries' dtype on load
):
    """One program = one (query tile of a sequence, kv head[, KV split]): online softmax.

    Every query head sharing the kv head is a row of the tile, so K/V are read once per group.
    """
    tile_idx = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq_idx = _find_seq_idx(query_start_loc_ptr, tile_idx, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq_idx)
    q_len = tl.load(query_start_loc_ptr + seq_idx + 1) - q_start
    q_tile = tile_idx - (q_start // BLOCK_Q + seq_idx)
    if q_tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq_idx)
    chunk_pos = seq_len - q_len  # position of the chunk's first query

    rows = tl.arange(0, BLOCK_M)
    q_idx = q_tile * BLOCK_Q + rows // GROUP  # [BLOCK_M] query within the chunk
    head = kv_head * GROUP + rows % GROUP  # [BLOCK_M] query head
    row_valid = (rows < BLOCK_Q * GROUP) & (q_idx < q_len)
    q_pos = chunk_pos + q_idx  # [BLOCK_M]
    dims = tl.arange(0, HEAD_DIM_P2)
    dim_valid = dims < HEAD_DIM
    q_tok = (q_start + q_idx).to(tl.int64)
    q_offs = q_tok[:, None] * stride_q_tok + head[:, None] * stride_q_head + dims[None, :]
    q = tl.load(q_ptr + q_offs, mask=row_valid[:, None] & dim_valid[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)  # [BLOCK_M, HEAD_DIM_P2]

    # Keys visible to this tile: [key_lo, key_hi), from the window of its first query to its last.
    key_hi = chunk_pos + tl.minimum(q_tile * BLOCK_Q + BLOCK_Q, q_len)
    key_lo = 0
    if HAS_WINDOW:
        key_lo = tl.maximum(chunk_pos + q_tile * BLOCK_Q - window + 1, 0)
        key_lo = (key_lo // BLOCK_N) * BLOCK_N
    if NUM_SPLITS > 1:  # this program's share of the key steps, BLOCK_N-aligned
        steps_per_split = tl.cdiv(tl.cdiv(key_hi - key_lo, BLOCK_N), NUM_SPLITS)
        key_lo = key_lo + tl.program_id(2) * steps_per_split * BLOCK_N
        key_hi = tl.minimum(key_hi, key_lo + steps_per_split * BLOCK_N)
    qk_scale = scale * 1.4426950408889634  # exp(x) = exp2(x * log2(e))
    table_row = block_tables_ptr + seq_idx.to(tl.int64) * stride_bt_seq
    head_off = kv_head.to(tl.int64) * stride_c_head

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running softmax denominator
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P2], dtype=tl.float32)
    for key_start in range(key_lo, key_hi, BLOCK_N):
        k_pos = key_start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        k_valid = k_pos < key_hi
        block_ids = tl.load(table_row + k_pos // block_size, mask=k_valid, other=0).to(tl.int64)
        slot_offs = block_ids * stride_c_block + (k_pos % block_size) * stride_c_slot + head_off
        kv_mask = k_valid[:, None] & dim_valid[None, :]  # [BLOCK_N, HEAD_DIM_P2]
        kv_offs = slot_offs[:, None] + dims[None, :]
        k = tl.load(key_cache_ptr + kv_offs, mask=kv_mask, other=0.0)  # [BLOCK_N, HEAD_DIM_P2]
        v = tl.load(value_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
        if KV_FP8 and not DOT_F32:
            k = k.to(q_ptr.dtype.element_ty)
            v = v.to(q_ptr.dtype.element_ty)
        if DOT_F32:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))  # [BLOCK_M, BLOCK_N] fp32
        allowed = k_valid[None, :] & (k_pos[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            allowed = allowed & ((q_pos[:, None] - k_pos[None, :]) < window)
        s = tl.where(allowed, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # NOTE: a row can have every key of a step masked (window, padding); keep it NaN-free.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])  # [BLOCK_M, BLOCK_N]
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DOT_F32:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)  # v in the queries' dtype (widened if fp8)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    if NUM_SPLITS > 1:
        # [num_tokens, num_heads, NUM_SPLITS] index of each row's partial
        part = (q_tok * (GROUP * tl.num_programs(1)) + head) * NUM_SPLITS + tl.program_id(2)
        tl.store(split_max_ptr + part, m_i, mask=row_valid)
        tl.store(split_sum_ptr + part, l_i, mask=row_valid)
        tl.store(split_acc_ptr + part[:, None] * HEAD_DIM_P2 + dims[None, :], acc,
                 mask=row_valid[:, None])
    else:
        acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_offs = q_tok[:, None] * stride_o_tok + head[:, None] * stride_o_head + dims[None, :]
        tl.store(out_ptr + o_offs, _round_to_output(acc, out_ptr, MANUAL_BF16),
                 mask=row_valid[:, None] & dim_valid[None, :])


@triton.jit
def reduce_splits_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim]
    split_acc_ptr,  # [num_tokens, num_heads, NUM_SPLITS, HEAD_DIM_P2] fp32
    split_max_ptr,  # [num_tokens, num_heads, NUM_SPLITS] fp32
    split_sum_ptr,  # [num_tokens, num_heads, NUM_SPLITS] fp32
    query_start_loc_ptr,  # [num_seqs + 1] int32
    num_seqs,
    stride_o_tok,
    stride_o_head,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    MANUAL_BF16: tl.constexpr,
):
    """One program per (token, head): merge the split partials into the normalised output."""
    token_idx = tl.program_id(0)
    head = tl.program_id(1)
    if token_idx >= tl.load(query_start_loc_ptr + num_seqs):  # padding token: no partials
        return
    part = (token_idx.to(tl.int64) * tl.num_programs(1) + head) * NUM_SPLITS
    splits = tl.arange(0, NUM_SPLITS)
    dims = tl.arange(0, HEAD_DIM_P2)
    m = tl.load(split_max_ptr + part + splits)  # [NUM_SPLITS]
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    weight = tl.exp2(m - m_max)  # [NUM_SPLITS]; 0 for empty splits
    total = tl.sum(tl.load(split_sum_ptr + part + splits) * weight, 0)
    acc = tl.load(split_acc_ptr + (part + splits)[:, None] * HEAD_DIM_P2 + dims[None, :])
    acc = tl.sum(acc * weight[:, None], 0) / tl.where(total == 0.0, 1.0, total)  # [HEAD_DIM_P2]
    o_offs = token_idx.to(tl.int64) * stride_o_tok + head * stride_o_head + dims
    tl.store(out_ptr + o_offs, _round_to_output(acc, out_ptr, MANUAL_BF16), mask=dims < HEAD_DIM)


IS_INTERPRETED: bool = not isinstance(paged_attention_kernel, JITFunction)


def write_kv(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64; negative slots are skipped
) -> None:
    """Write each token's k/v rows into its paged slot (kv_cache[:, slot // bs, slot % bs]).
    k/v come in the cache's dtype: an fp8 cache's rows are quantized beforehand (quantize_kv;
    triton's interpreter rounds fp8 wrongly, so the cast is kept out of the kernel)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    write_kv_kernel[(num_tokens,)](
        k, v, key_cache, value_cache, slot_mapping, key_cache.shape[1],
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        HEADS_P2=_next_pow2(num_kv_heads), HEAD_DIM_P2=_next_pow2(head_dim),
    )


def _tile_sizes(group: int, head_dim_p2: int, max_query_len: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_Q, BLOCK_N): small query tiles for decode, larger ones for prefill."""
    min_rows = 16  # tl.dot needs every dimension >= 16
    if max_query_len <= 1:
        block_m = max(min_rows, _next_pow2(group))
    else:
        block_m = max(64 if head_dim_p2 <= 128 else 32, _next_pow2(group))
    block_n = 64 if head_dim_p2 <= 128 else 32
    return block_m, max(block_m // group, 1), block_n


def decode_num_splits(num_seqs: int, num_kv_heads: int, target_programs: int = 256) -> int:
    """KV splits for a decode batch: enough programs to fill the GPU, a power of 2 in [1, 16].

    Depends on the batch shape only (not on context lengths), so a captured decode graph stays
    valid for any context; splits past a short context exit after writing an empty partial.
    """
    splits = 1
    while splits < 16 and num_seqs * num_kv_heads * splits * 2 <= target_programs:
        splits *= 2
    return splits


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    scale: float,
    sliding_window: int | None = None,
    max_query_len: int | None = None,  # host-side hint for tile sizes; None = prefill tiles
    num_splits: int = 1,  # > 1: split-K (flash-decoding) over the keys, then a reduce kernel
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Causal attention of each sequence's chunk of queries over its paged context."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = key_cache.shape[2]
    num_seqs = seq_lens.shape[0]
    if num_splits < 1 or num_splits & (num_splits - 1):
        raise ValueError(f"num_splits must be a power of 2, got {num_splits}")
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if num_tokens == 0 or num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    head_dim_p2 = max(_next_pow2(head_dim), 16)
    block_m, block_q, block_n = _tile_sizes(group, head_dim_p2, max_query_len or 2)
    manual_bf16 = IS_INTERPRETED and out.dtype == torch.bfloat16
    if num_splits > 1:
        split_acc = q.new_empty((num_tokens, num_heads, num_splits, head_dim_p2),
                                dtype=torch.float32)
        split_max = q.new_empty((num_tokens, num_heads, num_splits), dtype=torch.float32)
        split_sum = torch.empty_like(split_max)
    else:
        split_acc = split_max = split_sum = out  # unused
    grid = (num_tokens // block_q + num_seqs, num_kv_heads, num_splits)
    paged_attention_kernel[grid](
        out, q, key_cache, value_cache, query_start_loc, seq_lens, block_tables,
        split_acc, split_max, split_sum,
        scale, sliding_window or 0, num_seqs, key_cache.shape[1],
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, HEAD_DIM_P2=head_dim_p2,
        BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n, NUM_SPLITS=num_splits,
        HAS_WINDOW=sliding_window is not None,
        DOT_F32=IS_INTERPRETED or q.dtype == torch.float32,
        MANUAL_BF16=manual_bf16,
        KV_FP8=key_cache.element_size() == 1,
    )
    if num_splits > 1:
        reduce_splits_kernel[(num_tokens, num_heads)](
            out, split_acc, split_max, split_sum, query_start_loc, num_seqs,
            out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, HEAD_DIM_P2=head_dim_p2, NUM_SPLITS=num_splits,
            MANUAL_BF16=manual_bf16,
        )
    return out
