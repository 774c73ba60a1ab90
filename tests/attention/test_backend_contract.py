"""The contract every AttentionBackend passes: paged writes + causal attention = dense reference."""

from __future__ import annotations

import importlib.util
import os
import random

import pytest
import torch

from ember.attention.backend import AttentionSpec, BatchLayout, allocate_kv_cache
from ember.attention.torch_backend import TorchBackend
from ember.attention.triton_backend import TritonBackend  # imports triton only when run

# The Triton kernels see CPU tensors here: they need triton in interpreter mode (conftest.py).
_NEEDS_TRITON_INTERPRETER = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs triton with TRITON_INTERPRET=1 (CPU tensors)")
def _torch_ops_only() -> TorchBackend:
    return TorchBackend(use_kernel=False)


def _torch_with_kernel() -> TorchBackend:
    backend = TorchBackend()
    assert backend._lib is not None, "the C kernel did not build on this machine"
    return backend


BACKENDS = [_torch_ops_only, _torch_with_kernel,
            pytest.param(TritonBackend, marks=_NEEDS_TRITON_INTERPRETER)]


def _reference(q, k_all, v_all, ctx_len, q_len, spec):
    """Dense causal attention of one sequence's last q_len queries over ctx_len keys."""
    group = spec.num_heads // spec.num_kv_heads
    keys = k_all[:ctx_len].repeat_interleave(group, dim=1).transpose(0, 1)  # [heads, ctx, dim]
    values = v_all[:ctx_len].repeat_interleave(group, dim=1).transpose(0, 1)
    scores = torch.einsum("qhd,hkd->hqk", q.float(), keys.float()) * spec.scale
    q_pos = torch.arange(ctx_len - q_len, ctx_len).view(-1, 1)
    k_pos = torch.arange(ctx_len).view(1, -1)
    allowed = k_pos <= q_pos
    if spec.sliding_window is not None:
        allowed &= (q_pos - k_pos) < spec.sliding_window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,hkd->qhd", scores.softmax(-1), values.float())


def _run_steps(backend, spec, steps, block_size, dtype):
    """Feed each sequence's tokens in the given chunk sizes; compare every step's output."""
    rng = random.Random(0)
    num_blocks = 64
    kv_cache = allocate_kv_cache(1, num_blocks, block_size, spec.num_kv_heads, spec.head_dim,
                                 dtype, torch.device("cpu"), backend)[0]
    free_blocks = list(range(num_blocks))
    rng.shuffle(free_blocks)
    num_seqs = len(steps[0])
    tables = [[] for _ in range(num_seqs)]
    computed = [0] * num_seqs
    history_k = [torch.empty(0, spec.num_kv_heads, spec.head_dim, dtype=dtype)] * num_seqs
    history_v = list(history_k)
    for chunk_sizes in steps:
        q_parts, k_parts, v_parts, slots, q_lens, ctx_lens, seq_rows = [], [], [], [], [], [], []
        for s, n in enumerate(chunk_sizes):
            if n == 0:
                continue
            while len(tables[s]) * block_size < computed[s] + n:
                tables[s].append(free_blocks.pop())
            q_parts.append(torch.randn(n, spec.num_heads, spec.head_dim, dtype=dtype))
            k_parts.append(torch.randn(n, spec.num_kv_heads, spec.head_dim, dtype=dtype))
            v_parts.append(torch.randn(n, spec.num_kv_heads, spec.head_dim, dtype=dtype))
            for pos in range(computed[s], computed[s] + n):
                slots.append(tables[s][pos // block_size] * block_size + pos % block_size)
            computed[s] += n
            history_k[s] = torch.cat([history_k[s], k_parts[-1]])
            history_v[s] = torch.cat([history_v[s], v_parts[-1]])
            q_lens.append(n)
            ctx_lens.append(computed[s])
            seq_rows.append(s)
        layout = BatchLayout(q_lens, ctx_lens, [list(tables[s]) for s in seq_rows],
                             torch.tensor(slots), block_size)
        meta = backend.build_metadata(layout, torch.device("cpu"))
        out = backend.forward(torch.cat(q_parts), torch.cat(k_parts), torch.cat(v_parts),
                              kv_cache, meta, spec)
        start = 0
        for i, s in enumerate(seq_rows):
            expected = _reference(q_parts[i], history_k[s], history_v[s], ctx_lens[i],
                                  q_lens[i], spec)
            got = out[start:start + q_lens[i]].float()
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
            start += q_lens[i]


@pytest.mark.parametrize("backend_cls", BACKENDS)
@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,window",
    [(4, 4, 16, None), (8, 2, 32, None), (4, 1, 64, None), (6, 2, 24, 5)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_prefill_and_decode_match_dense_reference(backend_cls, heads, kv_heads, head_dim,
                                                        window, dtype):
    torch.manual_seed(0)
    spec = AttentionSpec(heads, kv_heads, head_dim, head_dim**-0.5, window)
    # Three sequences: chunked prefill of different lengths, then decodes mixed with a late prompt.
    steps = [
        [7, 3, 0],
        [5, 1, 0],
        [1, 1, 17],
        [1, 1, 4],
        [1, 1, 1],
        [1, 0, 1],
    ]
    _run_steps(backend_cls(), spec, steps, block_size=4, dtype=dtype)


@pytest.mark.parametrize("backend_cls", BACKENDS)
def test_pure_decode_batch(backend_cls):
    torch.manual_seed(1)
    spec = AttentionSpec(8, 4, 32, 32**-0.5)
    steps = [[9, 2, 13, 1]] + [[1, 1, 1, 1]] * 3
    _run_steps(backend_cls(), spec, steps, block_size=8, dtype=torch.float32)


def test_torch_backend_keeps_gpu_tensors_off_the_cpu_kernel():
    """The C kernel reads host memory: metadata for another device must not select it."""
    backend = TorchBackend()
    if backend._lib is None:
        pytest.skip("the C kernel did not build on this machine")
    layout = BatchLayout([2], [0], [[0]], torch.tensor([0, 1]), 4)
    assert backend.build_metadata(layout, torch.device("cpu")).kernel is not None
    assert backend.build_metadata(layout, torch.device("meta")).kernel is None
