"""Triton attention kernels and TritonBackend against a dense fp32 reference.

Without a GPU the kernels run in triton's interpreter (conftest.py sets TRITON_INTERPRET=1), so
shapes stay small; with one, the same tests launch on CUDA, plus the `gpu`-marked ones.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch

from ember.attention.backend import AttentionSpec, BatchLayout, allocate_kv_cache
from ember.attention.torch_backend import TorchBackend
from tests.triton_device import needs_compiled_gpu, triton_device

pytest.importorskip("triton")

from ember.attention import triton_kernels as tk  # noqa: E402  (after the triton check)
from ember.attention.triton_backend import TritonBackend  # noqa: E402

DEVICE = triton_device(tk.IS_INTERPRETED)
needs_gpu = needs_compiled_gpu(tk.IS_INTERPRETED)


def _reference(q, keys, values, context_len, spec):
    """Dense causal attention of one chunk's queries over its context, in fp32 on the CPU.

    q: [q_len, heads, dim]; keys/values: [context_len, kv_heads, dim] -> [q_len, heads, dim]
    """
    q, keys, values = q.cpu().float(), keys.cpu().float(), values.cpu().float()
    group = spec.num_heads // spec.num_kv_heads
    keys = keys.repeat_interleave(group, dim=1).transpose(0, 1)  # [heads, ctx, dim]
    values = values.repeat_interleave(group, dim=1).transpose(0, 1)
    scores = torch.einsum("qhd,hkd->hqk", q, keys) * spec.scale
    q_pos = torch.arange(context_len - q.shape[0], context_len).view(-1, 1)
    k_pos = torch.arange(context_len).view(1, -1)
    allowed = k_pos <= q_pos
    if spec.sliding_window is not None:
        allowed &= (q_pos - k_pos) < spec.sliding_window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,hkd->qhd", scores.softmax(-1), values)


class _PagedBatch:
    """Random sequences already in a paged cache whose unused slots hold NaN (to catch
    unmasked reads); block tables are padded with out-of-range ids (to catch stray lookups)."""

    def __init__(self, chunks: list[tuple[int, int]], spec: AttentionSpec, block_size: int,
                 dtype: torch.dtype, seed: int = 0) -> None:
        rng = random.Random(seed)
        gen = torch.Generator().manual_seed(seed)
        self.chunks, self.spec = chunks, spec  # chunks: [(query_len, context_len)] per seq
        kv_shape = (spec.num_kv_heads, spec.head_dim)
        blocks_per_seq = [-(-ctx // block_size) for _, ctx in chunks]
        num_blocks = sum(blocks_per_seq) + 3
        free = list(range(num_blocks))
        rng.shuffle(free)
        # [2, num_blocks, block_size, kv_heads, dim]
        cache = torch.full((2, num_blocks, block_size, *kv_shape), float("nan"))
        self.tables, self.keys, self.values = [], [], []
        for (_, ctx), num_seq_blocks in zip(chunks, blocks_per_seq):
            table = [free.pop() for _ in range(num_seq_blocks)]
            keys = torch.randn(ctx, *kv_shape, generator=gen).to(dtype)
            values = torch.randn(ctx, *kv_shape, generator=gen).to(dtype)
            for pos in range(ctx):
                cache[0, table[pos // block_size], pos % block_size] = keys[pos].float()
                cache[1, table[pos // block_size], pos % block_size] = values[pos].float()
            self.tables.append(table)
            self.keys.append(keys)
            self.values.append(values)
        self.kv_cache = cache.to(dtype).to(DEVICE)
        num_tokens = sum(q_len for q_len, _ in chunks)
        self.q = torch.randn(num_tokens, spec.num_heads, spec.head_dim, generator=gen).to(dtype)
        self.q = self.q.to(DEVICE)
        width = max(blocks_per_seq) + 1
        poison = num_blocks + 1000
        self.block_tables = torch.tensor(
            [t + [poison] * (width - len(t)) for t in self.tables], dtype=torch.int32,
            device=DEVICE)  # [num_seqs, width]
        starts = [0]
        for q_len, _ in chunks:
            starts.append(starts[-1] + q_len)
        self.query_start_loc = torch.tensor(starts, dtype=torch.int32, device=DEVICE)
        self.seq_lens = torch.tensor([c for _, c in chunks], dtype=torch.int32, device=DEVICE)
        self.max_query_len = max(q_len for q_len, _ in chunks)

    def check(self, out: torch.Tensor, tol: float) -> None:
        start = 0
        for s, (q_len, ctx) in enumerate(self.chunks):
            expected = _reference(self.q[start:start + q_len], self.keys[s], self.values[s], ctx,
                                  self.spec)
            got = out[start:start + q_len].cpu().float()
            torch.testing.assert_close(got, expected, atol=tol, rtol=tol, msg=f"sequence {s}")
            start += q_len


def _tol(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 2e-2


# (query_len, context_len) per sequence; block_size 4 puts many block boundaries in play.
CHUNKS = {
    "decode": [(1, 1), (1, 4), (1, 5), (1, 16), (1, 23)],
    "mixed": [(5, 5), (1, 9), (7, 12), (4, 4), (3, 21), (1, 1)],
    "long_prefill": [(70, 70), (2, 33)],
}
SPECS = {  # heads, kv_heads, head_dim, window
    "mha": (4, 4, 16, None),
    "gqa_odd_dim": (8, 2, 13, None),
    "mqa_group6_window": (6, 1, 40, 7),
    "gqa_window1": (4, 2, 32, 1),
}


# Split-K (flash-decoding) is costly to interpret (a reduce program per token and head), so it
# runs on a few cases; every spec and chunk mix runs unsplit.
SPLIT_CASES = [("gqa_odd_dim", "decode", 4), ("mqa_group6_window", "decode", 2),
               ("gqa_window1", "mixed", 4)]
CASES = [(spec, chunks, 1) for spec in SPECS for chunks in CHUNKS] + SPLIT_CASES


@pytest.mark.parametrize("spec_name,chunks_name,num_splits", CASES,
                         ids=["-".join(map(str, case)) for case in CASES])
def test_paged_attention_matches_reference(spec_name, chunks_name, num_splits):
    heads, kv_heads, head_dim, window = SPECS[spec_name]
    chunks = CHUNKS[chunks_name]
    spec = AttentionSpec(heads, kv_heads, head_dim, head_dim**-0.5, window)
    batch = _PagedBatch(chunks, spec, block_size=4, dtype=torch.float32)
    out = tk.paged_attention(batch.q, batch.kv_cache[0], batch.kv_cache[1],
                             batch.query_start_loc, batch.seq_lens, batch.block_tables,
                             spec.scale, window, max_query_len=batch.max_query_len,
                             num_splits=num_splits)
    batch.check(out, _tol(torch.float32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [3, 16])
def test_paged_attention_half_dtypes_and_block_sizes(dtype, block_size):
    spec = AttentionSpec(8, 2, 24, 24**-0.5, None)
    batch = _PagedBatch(CHUNKS["mixed"], spec, block_size=block_size, dtype=dtype, seed=1)
    out = tk.paged_attention(batch.q, batch.kv_cache[0], batch.kv_cache[1],
                             batch.query_start_loc, batch.seq_lens, batch.block_tables,
                             spec.scale, max_query_len=batch.max_query_len)
    assert out.dtype == dtype
    batch.check(out, _tol(dtype))


@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_paged_attention_reads_an_fp8_cache(dtype, cache_dtype):
    """Over an fp8 cache the kernel attends the values PyTorch decodes from it."""
    spec = AttentionSpec(8, 2, 32, 32**-0.5, None)
    batch = _PagedBatch(CHUNKS["mixed"], spec, block_size=4, dtype=dtype, seed=5)
    cache = batch.kv_cache.to(cache_dtype)
    batch.keys = [k.to(cache_dtype).float() for k in batch.keys]
    batch.values = [v.to(cache_dtype).float() for v in batch.values]
    out = tk.paged_attention(batch.q, cache[0], cache[1], batch.query_start_loc,
                             batch.seq_lens, batch.block_tables, spec.scale,
                             max_query_len=batch.max_query_len)
    assert out.dtype == dtype
    batch.check(out, _tol(dtype))


def test_paged_attention_reads_strided_q_and_decode_tiles():
    spec = AttentionSpec(4, 2, 16, 0.25, None)
    batch = _PagedBatch(CHUNKS["decode"], spec, block_size=4, dtype=torch.float32, seed=2)
    # q as a view of a fused qkv projection: [num_tokens, heads + 2 * kv_heads, dim]
    qkv = torch.randn(batch.q.shape[0], 8, 16, device=DEVICE)
    qkv[:, :4] = batch.q
    out = tk.paged_attention(qkv[:, :4], batch.kv_cache[0], batch.kv_cache[1],
                             batch.query_start_loc, batch.seq_lens, batch.block_tables,
                             spec.scale, max_query_len=1, num_splits=2)
    batch.check(out, _tol(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_heads,head_dim", [(3, 13), (2, 64)])
def test_write_kv_fills_slots_and_skips_padding(dtype, kv_heads, head_dim):
    num_blocks, block_size = 6, 4
    kv_cache = torch.zeros(2, num_blocks, block_size, kv_heads, head_dim, dtype=dtype,
                           device=DEVICE)
    slots = torch.tensor([5, 0, 23, -1, 11, 12], device=DEVICE)  # -1: a padding token
    k = torch.randn(6, kv_heads, head_dim).to(dtype).to(DEVICE)
    v = torch.randn(6, kv_heads, head_dim).to(dtype).to(DEVICE)
    tk.write_kv(k, v, kv_cache[0], kv_cache[1], slots)

    expected = torch.zeros_like(kv_cache).flatten(1, 2)  # [2, num_blocks * block_size, ...]
    real = slots >= 0
    expected[0, slots[real]] = k[real]
    expected[1, slots[real]] = v[real]
    assert torch.equal(kv_cache.flatten(1, 2), expected)


def _torch_layout(cache: torch.Tensor) -> torch.Tensor:
    """[2, blocks, block, kv_heads, dim] (Triton) -> [2, kv_heads, blocks, block, dim] (Torch)."""
    return cache.permute(0, 3, 1, 2, 4).contiguous()


def _default_layout(cache: torch.Tensor) -> torch.Tensor:
    return cache.permute(0, 2, 3, 1, 4).contiguous()


def test_backend_padded_metadata_keeps_addresses_and_ignores_padding():
    """The CUDA-graph buffer contract, checked without a graph."""
    spec = AttentionSpec(4, 2, 16, 0.25, None)
    backend = TritonBackend(max_num_seqs=4, max_num_tokens=8, max_blocks_per_seq=4)
    kv_cache = allocate_kv_cache(1, 8, 4, 2, 16, torch.float32, DEVICE)[0].normal_()
    first = backend.build_metadata(
        BatchLayout([3, 1], [3, 6], [[2], [5, 1]], torch.tensor([8, 9, 10, 5]), 4), DEVICE)
    layout = BatchLayout([1, 1], [4, 7], [[2], [5, 1]], torch.tensor([11, 6]), 4)
    meta = backend.build_metadata(layout, DEVICE)
    assert meta.seq_lens.data_ptr() == first.seq_lens.data_ptr()
    assert meta.block_tables.data_ptr() == first.block_tables.data_ptr()
    assert meta.slot_mapping.data_ptr() == first.slot_mapping.data_ptr()

    padded = meta.padded_to(num_seqs=4, num_tokens=4)
    assert padded.query_start_loc.tolist() == [0, 1, 2, 2, 2]
    assert padded.seq_lens.tolist() == [4, 7, 0, 0]
    assert padded.slot_mapping.tolist() == [11, 6, -1, -1]
    q = torch.randn(4, 4, 16, device=DEVICE)
    k = torch.randn(4, 2, 16, device=DEVICE)
    v = torch.randn(4, 2, 16, device=DEVICE)
    torch_cache = _torch_layout(kv_cache)
    out = backend.forward(q, k, v, kv_cache, padded, spec)

    torch_backend = TorchBackend()
    expected = torch_backend.forward(q[:2], k[:2], v[:2], torch_cache,
                                     torch_backend.build_metadata(layout, DEVICE), spec)
    torch.testing.assert_close(out[:2], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kv_cache, _default_layout(torch_cache))  # padding wrote nothing


@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_backend_with_an_fp8_cache_matches_the_torch_backend(cache_dtype):
    """A prefill chunk and a decode over an fp8 cache: both backends quantize the new rows the
    same way (large ones clamped, never NaN) and attend the same values."""
    spec = AttentionSpec(4, 2, 32, 32**-0.5, None)
    backend = TritonBackend(max_num_seqs=4, max_num_tokens=8, max_blocks_per_seq=4)
    cache = allocate_kv_cache(1, 8, 4, 2, 32, torch.float32, DEVICE)[0].normal_()
    kv_cache = cache.to(cache_dtype)
    layout = BatchLayout([3, 1], [3, 6], [[2], [5, 1]], torch.tensor([8, 9, 10, 5]), 4)
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(4, 4, 32, generator=gen).to(torch.bfloat16).to(DEVICE)
    k = (torch.randn(4, 2, 32, generator=gen) * 1e3).to(torch.bfloat16).to(DEVICE)
    v = torch.randn(4, 2, 32, generator=gen).to(torch.bfloat16).to(DEVICE)
    torch_cache = _torch_layout(kv_cache.view(torch.uint8)).view(cache_dtype)
    out = backend.forward(q, k, v, kv_cache, backend.build_metadata(layout, DEVICE), spec)

    torch_backend = TorchBackend()
    expected = torch_backend.forward(q, k, v, torch_cache,
                                     torch_backend.build_metadata(layout, DEVICE), spec)
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)
    assert torch.equal(kv_cache.view(torch.uint8),
                       _default_layout(torch_cache.view(torch.uint8)))
    assert torch.isfinite(kv_cache.float()).all()


def test_backend_rejects_what_it_cannot_serve():
    with pytest.raises(ValueError, match="max_blocks_per_seq"):
        TritonBackend(max_num_seqs=4, max_num_tokens=8)
    backend = TritonBackend(max_num_seqs=2, max_num_tokens=8, max_blocks_per_seq=2)
    with pytest.raises(ValueError, match="max_num_seqs"):
        backend.build_metadata(BatchLayout([1] * 3, [1] * 3, [[0], [1], [2]],
                                           torch.tensor([0, 4, 8]), 4), DEVICE)
    meta = backend.build_metadata(BatchLayout([2], [2], [[0]], torch.tensor([0, 1]), 4), DEVICE)
    spec = AttentionSpec(4, 2, 16, 0.25, None)
    kv_cache = allocate_kv_cache(1, 4, 4, 2, 16, torch.float32, DEVICE)[0]
    with pytest.raises(ValueError, match="dtypes differ"):
        backend.forward(torch.randn(2, 4, 16, device=DEVICE),
                        torch.randn(2, 2, 16, device=DEVICE, dtype=torch.float16),
                        torch.randn(2, 2, 16, device=DEVICE), kv_cache, meta, spec)


def test_importing_the_backend_does_not_import_triton():
    code = ("import sys, ember, ember.attention.triton_backend; "
            "assert 'triton' not in sys.modules, 'triton imported eagerly'")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


# --- GPU only: compiled kernels, tensor-core dtypes, split-K heuristics, CUDA graphs ---


def _run_both_backends(spec, chunks_per_step, dtype, triton_backend, block_size=16):
    """Feed the same steps to TritonBackend and TorchBackend on CUDA; compare with the CPU
    fp32 reference every step."""
    gen = torch.Generator().manual_seed(0)
    num_seqs = len(chunks_per_step[0])
    num_blocks = sum(-(-sum(col) // block_size) for col in zip(*chunks_per_step)) + 1
    torch_backend = TorchBackend()
    caches = {name: allocate_kv_cache(1, num_blocks, block_size, spec.num_kv_heads,
                                      spec.head_dim, dtype, DEVICE, backend)[0]
              for name, backend in (("triton", None), ("torch", torch_backend))}
    tables = [[] for _ in range(num_seqs)]
    next_block = iter(range(num_blocks))
    history_k = [torch.empty(0, spec.num_kv_heads, spec.head_dim, dtype=dtype)] * num_seqs
    history_v = list(history_k)
    computed = [0] * num_seqs
    for step in chunks_per_step:
        rows = [s for s, n in enumerate(step) if n]
        q_lens = [step[s] for s in rows]
        slots = []
        for s in rows:
            while len(tables[s]) * block_size < computed[s] + step[s]:
                tables[s].append(next(next_block))
            slots += [tables[s][p // block_size] * block_size + p % block_size
                      for p in range(computed[s], computed[s] + step[s])]
            computed[s] += step[s]
        num_tokens = sum(q_lens)
        q = torch.randn(num_tokens, spec.num_heads, spec.head_dim, generator=gen).to(dtype)
        k = torch.randn(num_tokens, spec.num_kv_heads, spec.head_dim, generator=gen).to(dtype)
        v = torch.randn(num_tokens, spec.num_kv_heads, spec.head_dim, generator=gen).to(dtype)
        layout = BatchLayout(q_lens, [computed[s] for s in rows], [list(tables[s]) for s in rows],
                             torch.tensor(slots), block_size)
        outs = {}
        for name, backend in (("triton", triton_backend), ("torch", torch_backend)):
            meta = backend.build_metadata(layout, DEVICE)
            outs[name] = backend.forward(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), caches[name],
                                         meta, spec).cpu().float()
        assert torch.equal(caches["triton"], _default_layout(caches["torch"]))
        tol = 1e-4 if dtype == torch.float32 else 2e-2  # GPU fp32 SDPA may differ a little more
        torch.testing.assert_close(outs["triton"], outs["torch"], atol=tol, rtol=tol)
        start = 0
        for i, s in enumerate(rows):
            history_k[s] = torch.cat([history_k[s], k[start:start + q_lens[i]]])
            history_v[s] = torch.cat([history_v[s], v[start:start + q_lens[i]]])
            expected = _reference(q[start:start + q_lens[i]], history_k[s], history_v[s],
                                  computed[s], spec)
            torch.testing.assert_close(outs["triton"][start:start + q_lens[i]], expected,
                                       atol=tol, rtol=tol)
            start += q_lens[i]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,head_dim,window",
                         [(32, 8, 128, None), (16, 16, 64, None), (8, 1, 80, 100),
                          (16, 2, 256, None)])
def test_gpu_matches_torch_backend(dtype, heads, kv_heads, head_dim, window):
    spec = AttentionSpec(heads, kv_heads, head_dim, head_dim**-0.5, window)
    steps = [[300, 17, 0], [1, 129, 0], [1, 1, 513], [1, 1, 1], [64, 1, 1]] + [[1, 1, 1]] * 3
    _run_both_backends(spec, steps, dtype, TritonBackend())


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("num_splits", [None, 1, 2, 16])  # None: the heuristic
def test_gpu_long_context_decode_splits(num_splits):
    spec = AttentionSpec(8, 2, 128, 128**-0.5, None)  # few heads: the CPU reference is dense
    steps = [[2500, 700]] + [[1, 1]] * 2
    _run_both_backends(spec, steps, torch.bfloat16, TritonBackend(decode_kv_splits=num_splits))


@pytest.mark.gpu
@needs_gpu
def test_gpu_cuda_graph_replays_decode_with_new_metadata():
    spec = AttentionSpec(8, 2, 64, 0.125, None)
    block_size, graph_seqs = 16, 8
    backend = TritonBackend(max_num_seqs=graph_seqs, max_num_tokens=64, max_blocks_per_seq=8)
    kv_cache = allocate_kv_cache(1, 64, block_size, 2, 64, torch.bfloat16, DEVICE)[0]
    kv_cache.normal_()
    tables = [[3 * s, 3 * s + 1, 3 * s + 2] for s in range(5)]

    def decode_layout(context_lens):
        slots = [tables[s][(c - 1) // block_size] * block_size + (c - 1) % block_size
                 for s, c in enumerate(context_lens)]
        return BatchLayout([1] * len(context_lens), context_lens,
                           [tables[s] for s in range(len(context_lens))],
                           torch.tensor(slots), block_size)

    static_q = torch.randn(graph_seqs, 8, 64, device=DEVICE, dtype=torch.bfloat16)
    static_k = torch.randn(graph_seqs, 2, 64, device=DEVICE, dtype=torch.bfloat16)
    static_v = torch.randn_like(static_k)
    meta = backend.build_metadata(decode_layout([5, 17, 33]), DEVICE).padded_to(graph_seqs,
                                                                                graph_seqs)
    backend.forward(static_q, static_k, static_v, kv_cache, meta, spec)  # compile outside
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = backend.forward(static_q, static_k, static_v, kv_cache, meta, spec)

    context_lens = [40, 2, 18, 47, 9]
    layout = decode_layout(context_lens)
    backend.build_metadata(layout, DEVICE)  # rewrites the buffers the graph reads
    static_q.normal_()
    static_k.normal_()
    static_v.normal_()
    graph.replay()
    expected_cache = _torch_layout(kv_cache)
    torch_backend = TorchBackend()
    expected = torch_backend.forward(static_q[:5], static_k[:5], static_v[:5], expected_cache,
                                     torch_backend.build_metadata(layout, DEVICE), spec)
    torch.testing.assert_close(static_out[:5].float(), expected.float(), atol=2e-2, rtol=2e-2)
    for s, c in enumerate(context_lens):  # and against the CPU fp32 reference
        keys = torch.stack([kv_cache[0, tables[s][p // block_size], p % block_size]
                            for p in range(c)])
        values = torch.stack([kv_cache[1, tables[s][p // block_size], p % block_size]
                              for p in range(c)])
        ref = _reference(static_q[s:s + 1], keys, values, c, spec)
        torch.testing.assert_close(static_out[s:s + 1].cpu().float(), ref, atol=2e-2, rtol=2e-2)
