"""The decoder's attention layer: fused qkv projection, optional q/k norm, rope, o_proj.

Paged KV storage and the attention maths belong to the backend found in the forward context;
this layer never touches the KV cache itself.
"""

from __future__ import annotations

import torch
from torch import nn

from ember.attention.backend import AttentionSpec
from ember.attention.context import get_forward_context
from ember.model.layers import Linear, RMSNorm, apply_rope
from ember.model.registry import DecoderConfig


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer_idx: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        # NOTE: qkv_proj rows are laid out [q | k | v]; the loader writes them in that order.
        self.qkv_proj = Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, cfg.qkv_bias,
                               dtype, device)
        self.o_proj = Linear(cfg.q_size, cfg.hidden_size, cfg.o_bias, dtype, device)
        self.q_norm = self.k_norm = None
        if cfg.qk_norm:  # per-head RMSNorm over head_dim (Qwen3)
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype, device)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype, device)
        self.spec = AttentionSpec(
            num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            scale=cfg.head_dim**-0.5,
            sliding_window=cfg.sliding_windows[layer_idx],
        )

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> [T, hidden]
        num_tokens = hidden.shape[0]
        num_qk_heads = self.num_heads + self.num_kv_heads
        qkv = self.qkv_proj(hidden)  # [T, (heads + 2 * kv_heads) * head_dim]
        qk = qkv[:, : num_qk_heads * self.head_dim].view(num_tokens, num_qk_heads, self.head_dim)
        if self.q_norm is not None:
            qk = torch.cat((self.q_norm(qk[:, : self.num_heads]),
                            self.k_norm(qk[:, self.num_heads:])), dim=1)
        qk = apply_rope(qk, cos, sin)  # [T, heads + kv_heads, head_dim], q and k in one pass
        q, k = qk.split((self.num_heads, self.num_kv_heads), dim=1)
        v = qkv[:, num_qk_heads * self.head_dim:].view(num_tokens, self.num_kv_heads, self.head_dim)
        ctx = get_forward_context()
        out = ctx.backend.forward(q, k, v, ctx.kv_caches[self.layer_idx], ctx.metadata,
                                  self.spec)  # [T, heads, head_dim]
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))
