"""GPU attention backend: step metadata in persistent device buffers; launches the Triton kernels.

Must not know about requests or scheduling. triton is imported lazily (on first forward), so
`import ember` and the CPU path work without it installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from ember.attention.backend import AttentionBackend, AttentionSpec, BatchLayout
from ember.attention.kv_dtype import FP8_DTYPES, quantize_kv


@dataclass
class _MetadataBuffers:
    """Device buffers at their maximum sizes, allocated once; every step writes into them."""

    query_start_loc: torch.Tensor  # [max_num_seqs + 1] int32
    seq_lens: torch.Tensor  # [max_num_seqs] int32
    block_tables: torch.Tensor  # [max_num_seqs, max_blocks_per_seq] int32
    slot_mapping: torch.Tensor  # [max_num_tokens] int64


@dataclass
class TritonMetadata:
    """One step's device tensors; with persistent buffers these are prefix views of them."""

    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32: tokens in the cache after this step
    block_tables: torch.Tensor  # [num_seqs, width] int32, rows padded with block 0
    slot_mapping: torch.Tensor  # [num_tokens] int64
    num_seqs: int
    num_tokens: int
    max_query_len: int
    buffers: _MetadataBuffers | None = None

    def padded_to(self, num_seqs: int, num_tokens: int) -> TritonMetadata:
        """The same step seen as a larger batch of inert padding (for CUDA-graph replay).

        Padding sequences have no queries and no context; padding tokens have slot -1, so
        neither writes the cache and their output rows are left unspecified.
        """
        bufs = self.buffers
        if bufs is None:
            raise ValueError("padded_to needs persistent buffers: construct TritonBackend with "
                             "max_num_seqs, max_num_tokens and max_blocks_per_seq")
        if not (self.num_seqs <= num_seqs <= bufs.seq_lens.shape[0]
                and self.num_tokens <= num_tokens <= bufs.slot_mapping.shape[0]):
            raise ValueError(f"cannot pad {self.num_seqs} seqs / {self.num_tokens} tokens to "
                             f"{num_seqs} / {num_tokens} within the buffers")
        return TritonMetadata(
            query_start_loc=bufs.query_start_loc[:num_seqs + 1],
            seq_lens=bufs.seq_lens[:num_seqs],
            block_tables=bufs.block_tables[:num_seqs],
            slot_mapping=bufs.slot_mapping[:num_tokens],
            num_seqs=num_seqs,
            num_tokens=num_tokens,
            max_query_len=self.max_query_len,
            buffers=bufs,
        )


def _kernels() -> ModuleType:
    from ember.attention import triton_kernels  # NOTE: lazy: imports triton

    return triton_kernels


class TritonBackend(AttentionBackend):
    """Paged attention with Triton kernels: one launch writes K/V, one (or two) attend.

    Buffer contract (for CUDA graphs): constructed with `max_num_seqs`, `max_num_tokens` and
    `max_blocks_per_seq`, the backend allocates its metadata tensors once per device at those
    sizes, and every `build_metadata` overwrites them in place and returns prefix views; so a
    graph captured over a step's metadata replays correctly after a later `build_metadata`.
    Past the live prefix the buffers are kept inert: query_start_loc holds num_tokens,
    seq_lens 0 and slot_mapping -1 (block_tables rows are not cleared; nothing reads them), which
    is what `TritonMetadata.padded_to` relies on. Consequently only the latest step's metadata
    is valid. A graph also bakes in the host-side fields it was captured with (num_seqs,
    num_tokens, max_query_len: grid, tile sizes, decode split count), so replay it only for
    steps of the same kind padded to the same shape with `padded_to`. A batch over any maximum
    is rejected with a ValueError naming it. Without the maxima, each step allocates fresh
    tensors.

    Decode-only steps use split-K (flash-decoding) on CUDA, with a split count that depends on
    the batch shape only; `decode_kv_splits` forces a count (a power of 2) on any device.
    """

    name = "triton"

    def __init__(self, max_num_seqs: int | None = None, max_num_tokens: int | None = None,
                 max_blocks_per_seq: int | None = None,
                 decode_kv_splits: int | None = None) -> None:
        maxima = {"max_num_seqs": max_num_seqs, "max_num_tokens": max_num_tokens,
                  "max_blocks_per_seq": max_blocks_per_seq}
        given = [name for name, value in maxima.items() if value is not None]
        if given and len(given) != len(maxima):
            missing = sorted(set(maxima) - set(given))
            raise ValueError(f"TritonBackend: {', '.join(given)} given without "
                             f"{', '.join(missing)}; pass all three or none")
        self.max_num_seqs = max_num_seqs
        self.max_num_tokens = max_num_tokens
        self.max_blocks_per_seq = max_blocks_per_seq
        if decode_kv_splits is not None and (decode_kv_splits < 1
                                             or decode_kv_splits & (decode_kv_splits - 1)):
            raise ValueError(f"decode_kv_splits must be a power of 2, got {decode_kv_splits}")
        self.decode_kv_splits = decode_kv_splits
        self._buffers: dict[torch.device, _MetadataBuffers] = {}

    def build_metadata(self, layout: BatchLayout, device: torch.device) -> TritonMetadata:
        num_seqs = len(layout.query_lens)
        if len(layout.context_lens) != num_seqs or len(layout.block_tables) != num_seqs:
            raise ValueError("BatchLayout: query_lens, context_lens and block_tables differ "
                             "in length")
        num_tokens = sum(layout.query_lens)
        query_start_loc = torch.zeros(num_seqs + 1, dtype=torch.int32)
        query_start_loc[1:] = torch.tensor(layout.query_lens, dtype=torch.int32).cumsum(0)
        if layout.slot_mapping.shape[0] != num_tokens:
            raise ValueError(f"BatchLayout.slot_mapping has {layout.slot_mapping.shape[0]} "
                             f"slots for {num_tokens} tokens")
        width = max((len(table) for table in layout.block_tables), default=0)
        tables = torch.tensor([table + [0] * (width - len(table))
                               for table in layout.block_tables], dtype=torch.int32)
        seq_lens = torch.tensor(layout.context_lens, dtype=torch.int32)
        slots = layout.slot_mapping.to(torch.int64)
        max_query_len = max(layout.query_lens, default=0)

        if self.max_num_seqs is None:
            return TritonMetadata(query_start_loc.to(device), seq_lens.to(device),
                                  tables.reshape(num_seqs, width).to(device), slots.to(device),
                                  num_seqs, num_tokens, max_query_len)

        self._check_fits(num_seqs, num_tokens, width)
        bufs = self._buffers_on(device)
        bufs.query_start_loc[:num_seqs + 1].copy_(query_start_loc, non_blocking=True)
        bufs.query_start_loc[num_seqs + 1:].fill_(num_tokens)
        bufs.seq_lens[:num_seqs].copy_(seq_lens, non_blocking=True)
        bufs.seq_lens[num_seqs:].zero_()
        bufs.block_tables[:num_seqs, :width].copy_(tables.reshape(num_seqs, width),
                                                   non_blocking=True)
        bufs.slot_mapping[:num_tokens].copy_(slots, non_blocking=True)
        bufs.slot_mapping[num_tokens:].fill_(-1)
        return TritonMetadata(bufs.query_start_loc[:num_seqs + 1], bufs.seq_lens[:num_seqs],
                              bufs.block_tables[:num_seqs], bufs.slot_mapping[:num_tokens],
                              num_seqs, num_tokens, max_query_len, bufs)

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        metadata: TritonMetadata,
        spec: AttentionSpec,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        _check_inputs(q, k, v, kv_cache, metadata, spec)
        kernels = _kernels()
        if q.device.type == "cpu" and not kernels.IS_INTERPRETED:
            raise RuntimeError("TritonBackend got CPU tensors but triton is not in interpreter "
                               "mode: set TRITON_INTERPRET=1 before triton is imported")
        key_cache, value_cache = kv_cache[0], kv_cache[1]  # [num_blocks, block, kv_heads, dim]
        kernels.write_kv(quantize_kv(k, key_cache.dtype), quantize_kv(v, value_cache.dtype),
                         key_cache, value_cache, metadata.slot_mapping)
        return kernels.paged_attention(
            q, key_cache, value_cache, metadata.query_start_loc, metadata.seq_lens,
            metadata.block_tables, spec.scale, spec.sliding_window,
            max_query_len=metadata.max_query_len,
            num_splits=self._decode_kv_splits(metadata, spec, q.device),
        )

    def _decode_kv_splits(self, metadata: TritonMetadata, spec: AttentionSpec,
                          device: torch.device) -> int:
        """Split-K (flash-decoding) for pure decode batches; on CUDA only unless forced."""
        if metadata.max_query_len != 1:
            return 1
        if self.decode_kv_splits is not None:
            return self.decode_kv_splits
        if device.type != "cuda":  # the interpreter runs programs serially: splits only cost
            return 1
        return _kernels().decode_num_splits(metadata.num_seqs, spec.num_kv_heads)

    def _check_fits(self, num_seqs: int, num_tokens: int, width: int) -> None:
        for name, value, limit in (("max_num_seqs", num_seqs, self.max_num_seqs),
                                   ("max_num_tokens", num_tokens, self.max_num_tokens),
                                   ("max_blocks_per_seq", width, self.max_blocks_per_seq)):
            if value > limit:
                raise ValueError(f"TritonBackend: batch needs {value} > {name}={limit}")

    def _buffers_on(self, device: torch.device) -> _MetadataBuffers:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # one buffer set for "cuda"/"cuda:0"
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._buffers:
            int32 = {"dtype": torch.int32, "device": device}
            self._buffers[device] = _MetadataBuffers(
                query_start_loc=torch.zeros(self.max_num_seqs + 1, **int32),
                seq_lens=torch.zeros(self.max_num_seqs, **int32),
                block_tables=torch.zeros(self.max_num_seqs, self.max_blocks_per_seq, **int32),
                slot_mapping=torch.full((self.max_num_tokens,), -1, dtype=torch.int64,
                                        device=device),
            )
        return self._buffers[device]


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                  metadata: TritonMetadata, spec: AttentionSpec) -> None:
    """Shape/dtype/layout checks the kernels rely on; host-side only, no device sync."""
    expected_q = (metadata.num_tokens, spec.num_heads, spec.head_dim)
    expected_kv = (metadata.num_tokens, spec.num_kv_heads, spec.head_dim)
    if tuple(q.shape) != expected_q:
        raise ValueError(f"q has shape {tuple(q.shape)}, expected {expected_q}")
    if tuple(k.shape) != expected_kv or tuple(v.shape) != expected_kv:
        raise ValueError(f"k/v have shapes {tuple(k.shape)}/{tuple(v.shape)}, "
                         f"expected {expected_kv}")
    if kv_cache.shape[0] != 2 or tuple(kv_cache.shape[3:]) != expected_kv[1:]:
        raise ValueError(f"kv_cache has shape {tuple(kv_cache.shape)}, expected "
                         f"[2, num_blocks, block_size, {spec.num_kv_heads}, {spec.head_dim}]")
    if spec.num_heads % spec.num_kv_heads:
        raise ValueError(f"num_heads={spec.num_heads} is not a multiple of "
                         f"num_kv_heads={spec.num_kv_heads}")
    if not (q.dtype == k.dtype == v.dtype) or kv_cache.dtype not in (q.dtype, *FP8_DTYPES):
        raise ValueError(f"dtypes differ: q {q.dtype}, k {k.dtype}, v {v.dtype}, "
                         f"kv_cache {kv_cache.dtype}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"unsupported dtype {q.dtype}")
    if any(t.stride(-1) != 1 for t in (q, k, v, kv_cache)):
        raise ValueError("q, k, v and kv_cache need a contiguous last (head_dim) dimension")
    if spec.sliding_window is not None and spec.sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {spec.sliding_window}")
