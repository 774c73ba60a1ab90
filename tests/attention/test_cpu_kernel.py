"""The compiled CPU attention kernel: dense-attention results for every head dim, block size,
group size and window it serves, and no change to the process's floating-point state."""

from __future__ import annotations

import ctypes
import itertools
import platform
import subprocess
import sys

import pytest
import torch

from ember.attention import cpu_kernel
from ember.attention.cpu_kernel import load_kernel, paged_attention
from ember.native import load_cpu_kernel


def test_loading_the_kernel_keeps_subnormals():
    # a fresh process: this one may already have loaded the kernel
    code = ("from ember.attention.cpu_kernel import load_kernel\n"
            "tiny = float.fromhex('0x0.0000000000001p-1022')\n"
            "assert tiny * 1.0 > 0\n"
            "if load_kernel() is None: raise SystemExit(3)\n"
            "assert tiny * 1.0 > 0, 'flush-to-zero was switched on'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    if proc.returncode == 3:
        pytest.skip("no C compiler here: the kernel is not built")
    assert proc.returncode == 0, proc.stderr


def _dense_reference(q, keys, values, q_len, scale, window):
    """q [q_len, heads, dim] at the context's last q_len positions; keys/values [ctx, kv, dim]."""
    ctx, kv_heads, _ = keys.shape
    group = q.shape[1] // kv_heads
    k = keys.float().repeat_interleave(group, dim=1).transpose(0, 1)
    v = values.float().repeat_interleave(group, dim=1).transpose(0, 1)
    scores = torch.einsum("qhd,hkd->hqk", q.float(), k) * scale
    q_pos = torch.arange(ctx - q_len, ctx).view(-1, 1)
    k_pos = torch.arange(ctx).view(1, -1)
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= (q_pos - k_pos) < window
    return torch.einsum("hqk,hkd->qhd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v)


_X86_BUILDS = {  # what other x86 CPUs build, checked on this one
    "no-bf16-dot": ["-mno-avx512bf16"],  # widening bf16 rows (16 lanes)
    "no-avx512": ["-mno-avx512f"],  # AVX2: 8-lane tiles
}


@pytest.fixture(scope="module", params=["native", *_X86_BUILDS])
def kernel(request):
    """The kernel as built here, and built as CPUs without a bf16 dot product or without
    AVX-512 build it, so the paths other CPUs take are checked too."""
    lib = load_kernel()
    if lib is None:
        pytest.skip("no C compiler here: the kernel is not built")
    if request.param in _X86_BUILDS:
        if platform.machine() != "x86_64":
            pytest.skip(f"{_X86_BUILDS[request.param]} are x86 flags")
        lib = load_cpu_kernel(f"paged_attention_{request.param}", cpu_kernel._SOURCE,
                              _X86_BUILDS[request.param])
        assert lib is not None
        lib.paged_attention.restype = ctypes.c_int
    return lib


E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


@pytest.mark.parametrize("dtype,cache_dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, E4M3),
    (torch.bfloat16, E5M2), (torch.float32, E4M3)])
@pytest.mark.parametrize("head_dim", [32, 64, 80, 96, 128, 256])
@pytest.mark.parametrize("block_size,heads,kv_heads,window", [
    (4, 8, 8, None), (16, 8, 2, None), (32, 8, 1, 23), (8, 16, 2, 5)])
def test_kernel_matches_dense_attention(kernel, dtype, cache_dtype, head_dim, block_size, heads,
                                       kv_heads, window):
    """Contexts of many 16-position tiles, over scattered blocks of every size, mixing
    prefill chunks (one longer than a block of query rows, starting mid-context) with decodes
    (one over several of the decode path's 128-position chunks):
    each output equals dense softmax attention over the cache's values (an fp8 cache as
    PyTorch decodes it)."""
    gen = torch.Generator().manual_seed(head_dim + block_size)
    context_lens, query_lens = [1, 37, 70, 16, 90, 150, 300], [1, 1, 20, 16, 1, 130, 1]
    max_blocks = max(-(-c // block_size) for c in context_lens)
    num_blocks = max_blocks * len(context_lens) + 3
    key_cache, value_cache = (
        torch.randn(kv_heads, num_blocks, block_size, head_dim, generator=gen).to(cache_dtype)
        for _ in range(2))
    tables = torch.randperm(num_blocks, generator=gen)[:max_blocks * len(context_lens)]
    tables = tables.view(len(context_lens), max_blocks).to(torch.int64)
    q = torch.randn(sum(query_lens), heads, head_dim, generator=gen).to(dtype)
    query_start = torch.tensor([0, *itertools.accumulate(query_lens)], dtype=torch.int32)
    scale = head_dim ** -0.5
    out = paged_attention(kernel, q, key_cache, value_cache, tables, query_start,
                          torch.tensor(context_lens, dtype=torch.int32), scale, window)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for s, (ctx, q_len) in enumerate(zip(context_lens, query_lens)):
        positions = torch.arange(ctx)
        blocks = tables[s][positions // block_size]
        keys = key_cache[:, blocks, positions % block_size].transpose(0, 1)
        values = value_cache[:, blocks, positions % block_size].transpose(0, 1)
        rows = slice(query_start[s].item(), query_start[s + 1].item())
        expected = _dense_reference(q[rows], keys, values, q_len, scale, window)
        torch.testing.assert_close(out[rows].float(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_rescales_when_a_later_chunk_holds_the_largest_score(kernel, dtype):
    """A decode reads its context 128 positions at a time; keys that grow along the context
    put each chunk's largest score above the last one's, so every chunk rescales what came
    before it: the output still equals dense softmax attention."""
    gen = torch.Generator().manual_seed(7)
    ctx, heads, kv_heads, dim, block_size = 700, 4, 2, 64, 16
    num_blocks = -(-ctx // block_size)
    growth = torch.linspace(0.1, 3.0, ctx).view(1, ctx, 1)
    keys = (torch.randn(kv_heads, ctx, dim, generator=gen) * growth).abs()
    values = torch.randn(kv_heads, ctx, dim, generator=gen)
    pad = num_blocks * block_size - ctx
    key_cache, value_cache = (
        torch.nn.functional.pad(x, (0, 0, 0, pad)).view(kv_heads, num_blocks, block_size, dim)
        .to(dtype) for x in (keys, values))
    q = torch.rand(1, heads, dim, generator=gen).to(dtype)
    out = paged_attention(kernel, q, key_cache, value_cache,
                          torch.arange(num_blocks, dtype=torch.int64).view(1, -1),
                          torch.tensor([0, 1], dtype=torch.int32),
                          torch.tensor([ctx], dtype=torch.int32), dim ** -0.5, None)
    expected = _dense_reference(q, key_cache.flatten(1, 2)[:, :ctx].transpose(0, 1),
                                value_cache.flatten(1, 2)[:, :ctx].transpose(0, 1), 1,
                                dim ** -0.5, None)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("cache_dtype", [E4M3, E5M2])
def test_kernel_widens_every_fp8_value_as_pytorch_does(kernel, cache_dtype):
    """Each sequence has one position, so its output is that position's value row: every
    finite fp8 bit pattern (subnormals, both zeros, the largest) must come out as PyTorch's
    own conversion gives it."""
    dim = 32
    bits = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    finite = bits[torch.isfinite(bits.view(cache_dtype).float())]
    rows = torch.cat([finite, finite[:(-len(finite)) % dim]]).view(-1, dim)  # padded to rows
    num_seqs = rows.shape[0]
    value_cache = rows.view(cache_dtype).view(1, num_seqs, 1, dim)
    key_cache = torch.zeros_like(value_cache)
    out = paged_attention(kernel, torch.ones(num_seqs, 1, dim), key_cache, value_cache,
                          torch.arange(num_seqs, dtype=torch.int64).view(-1, 1),
                          torch.arange(num_seqs + 1, dtype=torch.int32),
                          torch.ones(num_seqs, dtype=torch.int32), 1.0, None)
    assert torch.equal(out.view(-1, dim), rows.view(cache_dtype).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_matches_index_copy_on_strided_rows(dtype):
    """K and V as the model hands them over (strided views of one qkv tensor) land in the
    same slots as PyTorch's index_copy_ puts them; a slot outside the cache writes nothing."""
    lib = load_kernel()
    if lib is None:
        pytest.skip("no C compiler here: the kernel is not built")
    gen = torch.Generator().manual_seed(7)
    kv_heads, blocks, block, dim, tokens = 3, 10, 4, 32, 9
    qkv = torch.randn(tokens, (4 + 2 * kv_heads) * dim, generator=gen).to(dtype)
    k = qkv[:, 4 * dim:(4 + kv_heads) * dim].view(tokens, kv_heads, dim)
    v = qkv[:, (4 + kv_heads) * dim:].view(tokens, kv_heads, dim)
    slots = torch.randperm(blocks * block, generator=gen)[:tokens]
    caches = torch.zeros(2, kv_heads, blocks, block, dim, dtype=dtype)
    expected = caches.clone()
    assert cpu_kernel.write_kv(lib, k, v, caches[0], caches[1], slots)
    flat = (kv_heads, -1, dim)
    expected[0].view(flat).index_copy_(1, slots, k.transpose(0, 1))
    expected[1].view(flat).index_copy_(1, slots, v.transpose(0, 1))
    assert torch.equal(caches, expected)

    before = caches.clone()
    bad = slots.clone()
    bad[-1] = blocks * block
    with pytest.raises(IndexError, match="outside the cache"):
        cpu_kernel.write_kv(lib, k, v, caches[0], caches[1], bad)
    assert torch.equal(caches, before)
    assert not cpu_kernel.write_kv(lib, k.float() if dtype != torch.float32 else k.double(), v,
                                   caches[0], caches[1], slots)  # dtype mismatch: caller's path
