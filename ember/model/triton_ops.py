"""Fused elementwise Triton kernels for the decoder on a GPU: residual add + RMSNorm, neox RoPE,
SiLU-and-mul. Each replaces several PyTorch kernels with one (in a decode step these small
kernels, not their arithmetic, cost the time) and rounds where PyTorch's ops round, so their
results are PyTorch's (RMSNorm's sum of squares may differ in its last fp32 bits).

Off unless EMBER_FUSED_OPS=1 (ember.envs): their numerics are tested in the interpreter, but
they have not yet been compiled and timed on a GPU.

Importing this imports triton. Under TRITON_INTERPRET=1 (CPU tests) bfloat16 arithmetic and
casts are wrong in triton's interpreter, so every kernel works in float32 and reads and writes
bfloat16 as raw 16-bit words, in both modes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@triton.jit
def _load(ptr, offs, mask, KIND: tl.constexpr):
    """Elements as float32 (KIND 1: ptr holds bfloat16 bits as int16)."""
    if KIND == 1:
        raw = tl.load(ptr + offs, mask=mask, other=0).to(tl.uint16, bitcast=True)
        return (raw.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptr + offs, mask=mask, other=0).to(tl.float32)


@triton.jit
def _round(x, KIND: tl.constexpr):
    """float32 -> the nearest value of the storage dtype (ties to even), still as float32."""
    if KIND == 1:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16  # constants fit int32
        return bits.to(tl.float32, bitcast=True)
    elif KIND == 2:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def _store(ptr, offs, x, mask, KIND: tl.constexpr):
    """Store float32 values already rounded by _round."""
    if KIND == 1:
        bits = (x.to(tl.uint32, bitcast=True) >> 16).to(tl.uint16)
        tl.store(ptr + offs, bits.to(tl.int16, bitcast=True), mask=mask)
    else:
        tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, sum_ptr, dim, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, KIND: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    x = _load(x_ptr, row * dim + cols, mask, KIND)
    if HAS_RESIDUAL:
        x = _round(x + _load(residual_ptr, row * dim + cols, mask, KIND), KIND)
        _store(sum_ptr, row * dim + cols, x, mask, KIND)
    normed = x * tl.rsqrt(tl.sum(x * x, axis=0) / dim + eps)
    weight = _load(weight_ptr, cols, mask, KIND)
    _store(out_ptr, row * dim + cols, _round(weight * _round(normed, KIND), KIND), mask, KIND)


@triton.jit
def _silu_and_mul_kernel(gate_up_ptr, out_ptr, inter, BLOCK: tl.constexpr, KIND: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = _load(gate_up_ptr, row * 2 * inter + cols, mask, KIND)
    up = _load(gate_up_ptr, row * 2 * inter + inter + cols, mask, KIND)
    silu = _round(gate / (1.0 + tl.exp(-gate)), KIND)
    _store(out_ptr, row * inter + cols, _round(silu * up, KIND), mask, KIND)


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, stride_tok, stride_head, num_heads,
                 HALF: tl.constexpr, HALF_P2: tl.constexpr, KIND: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1)
    cols = tl.arange(0, HALF_P2)
    mask = cols < HALF
    src = tok * stride_tok + heads * stride_head + cols
    x1 = _load(x_ptr, src, mask, KIND)
    x2 = _load(x_ptr, src + HALF, mask, KIND)
    cos1 = _load(cos_ptr, tok * 2 * HALF + cols, mask, KIND)
    cos2 = _load(cos_ptr, tok * 2 * HALF + HALF + cols, mask, KIND)
    sin1 = _load(sin_ptr, tok * 2 * HALF + cols, mask, KIND)
    sin2 = _load(sin_ptr, tok * 2 * HALF + HALF + cols, mask, KIND)
    # x * cos + cat(-x2, x1) * sin, each product rounded, then their sum
    dst = (tok * num_heads + heads) * 2 * HALF + cols
    _store(out_ptr, dst, _round(_round(x1 * cos1, KIND) + _round(-x2 * sin1, KIND), KIND),
           mask, KIND)
    _store(out_ptr, dst + HALF, _round(_round(x2 * cos2, KIND) + _round(x1 * sin2, KIND), KIND),
           mask, KIND)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """What the kernels take for a tensor: bfloat16 as its int16 words, others as they are."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * rmsnorm(s), s) for s = x (+ residual): [T, dim] contiguous -> same, twice."""
    out = torch.empty_like(x)
    summed = torch.empty_like(x) if residual is not None else x
    dim = x.shape[-1]
    _rms_norm_kernel[(x.numel() // dim,)](
        _bits(x), _bits(residual if residual is not None else x), _bits(weight), _bits(out),
        _bits(summed), dim, eps, HAS_RESIDUAL=residual is not None,
        BLOCK=triton.next_power_of_2(dim), KIND=_KIND[x.dtype])
    return out, summed


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2 * inter] contiguous, [gate | up] -> silu(gate) * up [T, inter]."""
    inter = gate_up.shape[-1] // 2
    out = gate_up.new_empty(*gate_up.shape[:-1], inter)
    block = min(1024, triton.next_power_of_2(inter))
    _silu_and_mul_kernel[(gate_up.numel() // (2 * inter), triton.cdiv(inter, block))](
        _bits(gate_up), _bits(out), inter, BLOCK=block, KIND=_KIND[gate_up.dtype])
    return out


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Neox RoPE of x [T, heads, head_dim] (rows may be strided, the last dim contiguous) with
    cos/sin [T, 1, head_dim] -> a new contiguous [T, heads, head_dim]."""
    num_tokens, num_heads, head_dim = x.shape
    if x.stride(2) != 1:
        raise ValueError("apply_rope needs the head dimension contiguous")
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    half = head_dim // 2
    _rope_kernel[(num_tokens, num_heads)](
        _bits(x), _bits(cos.contiguous()), _bits(sin.contiguous()), _bits(out), x.stride(0),
        x.stride(1), num_heads, HALF=half, HALF_P2=triton.next_power_of_2(half),
        KIND=_KIND[x.dtype])
    return out
