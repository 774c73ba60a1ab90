"""Dense building blocks of the shared decoder: linear, embedding, RMSNorm, rotary, gated MLP.

Parameters are allocated uninitialised (the loader fills them in place); nothing here reads files.
Numerics follow transformers' Llama-family modules op for op so fp32 logits match to ~1e-6.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from ember import envs
from ember.model import cpu_ops, panel_gemm, widened_gemm
from ember.model.registry import RopeConfig


def fused_ops(x: torch.Tensor) -> ModuleType | None:
    """The fused elementwise ops for x, or None for the PyTorch ops: ember.model.cpu_ops for a
    float32/bfloat16 CPU tensor (unless EMBER_CPU_FUSED_OPS=0 or no C compiler), and
    ember.model.triton_ops for a GPU tensor when EMBER_FUSED_OPS=1."""
    if x.is_cuda:
        return _triton_ops() if _gpu_fusion_on() else None
    return cpu_ops if _cpu_fusion_on() and cpu_ops.supports(x) else None


@functools.cache
def _gpu_fusion_on() -> bool:
    return envs.fused_ops()


@functools.cache
def _cpu_fusion_on() -> bool:
    return envs.cpu_fused_ops()


@functools.cache
def _triton_ops() -> ModuleType | None:
    try:
        from ember.model import triton_ops  # NOTE: lazy: imports triton
    except ImportError:
        return None
    return triton_ops


def empty_parameter(shape: tuple[int, ...], dtype: torch.dtype,
                    device: torch.device | str) -> nn.Parameter:
    """An uninitialised, frozen parameter; the loader overwrites every element."""
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


@functools.cache
def onednn_bf16_supported() -> bool:
    """Whether oneDNN can pack and run bf16 GEMMs here (it needs AVX-512 or AVX-NE-CONVERT)."""
    return _onednn_probe("_is_mkldnn_bf16_supported")


@functools.cache
def onednn_fp16_supported() -> bool:
    return _onednn_probe("_is_mkldnn_fp16_supported")


def _onednn_probe(name: str) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(getattr(torch.ops.mkldnn, name)())
    except (AttributeError, RuntimeError):  # a torch without the probe: assume not
        return False


class Linear(nn.Module):
    """y = x W^T (+ b), with W [out, in]; `weight` may be shared (tied lm_head).

    On the CPU, `prepack_cpu()` swaps in a oneDNN-packed copy of a bf16 or fp32 weight: 1.2-2.5x
    faster GEMMs (F.linear repacks a bf16 weight on every call, and runs fp32 through another
    BLAS); bf16 results are bit-identical, fp32 ones differ in the order of the sums. Where oneDNN
    has no bf16 or fp16 kernels (AVX2), such a weight is packed into panel_gemm.py's column
    panels instead; one that cannot be packed (refilled per layer, or no AVX2 kernel) goes
    through widened_gemm.py.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 device: torch.device | str, weight: nn.Parameter | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = weight if weight is not None else empty_parameter(
            (out_features, in_features), dtype, device)
        self.bias = empty_parameter((out_features,), dtype, device) if bias else None
        self.packed_weight: torch.Tensor | None = None
        self.panels: torch.Tensor | None = None  # bf16 column panels (panel_gemm.py)
        self.resident_weight = False  # refilled per layer (compress/resident.py): never pack
        self.widen_half = False  # a 16-bit weight computed through widened_gemm.py

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        if self.panels is not None:
            return panel_gemm.linear(x, self.panels, self.bias, self.out_features)
        if self.packed_weight is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none",
                                                      [], "")
        if self.widen_half:
            return widened_gemm.half_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def forward_float32(self, x: torch.Tensor) -> torch.Tensor:
        """forward(x).float(), in one pass where the kernel can write float32 itself."""
        if self.panels is not None:
            return panel_gemm.linear(x, self.panels, self.bias, self.out_features,
                                     out_float32=True)
        return self(x).float()

    def prepack_cpu(self) -> bool:
        """Pack a bf16 or fp32 CPU weight for oneDNN, or a bf16 or fp16 one that oneDNN cannot
        run into column panels (panel_gemm.py), and drop this module's plain copy (a tied
        embedding keeps its own); an unpackable 16-bit weight is routed through
        widened_gemm.py. Returns whether the weight was packed."""
        weight = self.weight
        if weight.device.type != "cpu":
            return False
        onednn_half = {torch.bfloat16: onednn_bf16_supported, torch.float16: onednn_fp16_supported}
        if weight.dtype in onednn_half and not onednn_half[weight.dtype]():
            if self.resident_weight or not panel_gemm.available():
                self.widen_half = True
                return False
            self.panels = panel_gemm.pack(weight.detach())
            self.weight = nn.Parameter(weight.new_empty(0), requires_grad=False)
            return True
        if weight.dtype not in (torch.bfloat16, torch.float32) or self.resident_weight:
            return False
        if not torch.backends.mkldnn.is_available():
            return False
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 64)
        self.weight = nn.Parameter(weight.new_empty(0), requires_grad=False)
        return True


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__()
        self.weight = empty_parameter((num_embeddings, dim), dtype, device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, dim]
        return F.embedding(ids, self.weight)


class RMSNorm(nn.Module):
    """Normalise in float32, cast back, then scale (transformers' LlamaRMSNorm order)."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__()
        self.weight = empty_parameter((dim,), dtype, device)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., dim] -> [..., dim]
        ops = fused_ops(x)
        if ops is not None and x.is_contiguous():
            return ops.rms_norm(x, self.weight, self.eps)[0]
        normed = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        return self.weight * normed.to(x.dtype)

    def add_and_norm(self, x: torch.Tensor,
                     residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual), [T, dim] each; one kernel on a GPU. x must be a
        fresh tensor (a layer's output): elsewhere the sum is taken in place, into x."""
        ops = fused_ops(x)
        if ops is not None:
            return ops.rms_norm(x.contiguous(), self.weight, self.eps, residual.contiguous())
        summed = x.add_(residual)
        return self.forward(summed), summed


class RotaryEmbedding(nn.Module):
    """cos/sin tables for a step's positions, computed once per forward and shared by all layers."""

    def __init__(self, rope: RopeConfig, device: torch.device | str) -> None:
        super().__init__()
        inv_freq = torch.tensor(rope.inv_freq, dtype=torch.float32, device=device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [head_dim // 2]
        self.attention_scaling = rope.attention_scaling

    def forward(self, positions: torch.Tensor,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.unsqueeze(-1).float() * self.inv_freq  # [T, head_dim // 2]
        angles = torch.cat((freqs, freqs), dim=-1)  # [T, head_dim]
        cos, sin = angles.cos(), angles.sin()
        if self.attention_scaling != 1.0:
            cos *= self.attention_scaling
            sin *= self.attention_scaling
        return cos.to(dtype).unsqueeze(1), sin.to(dtype).unsqueeze(1)  # [T, 1, head_dim] each


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Neox-style rotation: x * cos + rotate_half(x) * sin. x [T, heads, head_dim] -> same."""
    ops = fused_ops(x)
    if ops is not None and x.stride(-1) == 1:
        return ops.apply_rope(x, cos, sin)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # [T, heads, head_dim]
    rotated *= sin
    out = x * cos
    out += rotated
    return out


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one [2 * inter, hidden] GEMM."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__()
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, bias, dtype, device)
        self.down_proj = Linear(intermediate_size, hidden_size, bias, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> [T, hidden]
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2 * inter] laid out [gate | up] -> silu(gate) * up [..., inter]."""
    fused = getattr(fused_ops(gate_up), "silu_and_mul", None)  # the CPU ops have none
    if fused is not None and gate_up.is_contiguous():
        return fused(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    out = F.silu(gate)
    out *= up
    return out
