"""The one decoder every supported architecture runs on: pre-norm layers of attention + (MoE) MLP.

Works on the flat token batch of one step; attention metadata and KV caches come from the
forward context. No `.item()`/`.tolist()` and no loop over sequences in the forward.
"""

from __future__ import annotations

import torch
from torch import nn

from ember.attention.context import layer_hook
from ember.model.attention import Attention
from ember.model.layers import Embedding, GatedMLP, Linear, RMSNorm, RotaryEmbedding
from ember.model.moe import SparseMoE
from ember.model.registry import DecoderConfig


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer_idx: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__()
        hidden, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(hidden, eps, dtype, device)
        self.self_attn = Attention(cfg, layer_idx, dtype, device)
        self.post_attention_layernorm = RMSNorm(hidden, eps, dtype, device)
        if cfg.moe is not None and cfg.moe_layers[layer_idx]:
            self.mlp: nn.Module = SparseMoE(hidden, cfg.moe, dtype, device)
        else:
            self.mlp = GatedMLP(hidden, cfg.intermediate_size, cfg.mlp_bias, dtype, device)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden, residual) [T, hidden] each -> the same for the next layer, whose input is
        their sum: adding it there fuses with that layer's norm (residual None: the first)."""
        if residual is None:
            residual = hidden
            normed = self.input_layernorm(hidden)
        else:
            normed, residual = self.input_layernorm.add_and_norm(hidden, residual)
        attn_out = self.self_attn(normed, cos, sin)
        normed, residual = self.post_attention_layernorm.add_and_norm(attn_out, residual)
        return self.mlp(normed), residual


class DecoderModel(nn.Module):
    """Token ids + positions of one step -> final-normed hidden states; logits on demand."""

    def __init__(self, cfg: DecoderConfig, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.config = cfg
        self.dtype = dtype
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype, device)
        self.rotary = RotaryEmbedding(cfg.rope, device)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, dtype, device) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        tied = self.embed_tokens.weight if cfg.tie_word_embeddings else None
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, False, dtype, device, weight=tied)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T] int64 -> hidden [T, hidden_size] (after the final norm)."""
        hidden = self.embed_tokens(input_ids)  # [T, hidden]
        cos, sin = self.rotary(positions, hidden.dtype)  # [T, 1, head_dim] each
        residual = None
        after_layer = layer_hook()
        for i, layer in enumerate(self.layers):
            hidden, residual = layer(hidden, residual, cos, sin)
            if after_layer is not None:
                after_layer(i)
        return self.norm.add_and_norm(hidden, residual)[0]

    def prepack_cpu(self) -> int:
        """Pack bf16 linear weights for oneDNN (see Linear.prepack_cpu); returns how many."""
        return sum(m.prepack_cpu() for m in self.modules() if isinstance(m, Linear))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] float32 (matmul in the model dtype, like transformers)."""
        return self.lm_head.forward_float32(hidden)
