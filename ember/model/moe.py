"""Sparse mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE), routed like transformers.

Vectorised over tokens and sync-free: tokens are sorted by expert and every expert runs in one
grouped GEMM (`F.grouped_mm`), so no Python loop over tokens or experts and no host read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.model.layers import GatedMLP, Linear, empty_parameter, silu_and_mul
from ember.model.registry import MoEConfig


class SparseMoE(nn.Module):
    """softmax -> top-k (-> renormalise) over experts, plus an optional sigmoid-gated shared MLP."""

    def __init__(self, hidden_size: int, moe: MoEConfig, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__()
        self.num_experts, self.top_k = moe.num_experts, moe.top_k
        self.renormalize = moe.renormalize
        self.fp32_routing_weights = moe.fp32_routing_weights
        has_shared = moe.shared_expert_intermediate_size > 0
        # NOTE: router rows are [experts | shared_expert_gate]: one GEMM scores both.
        self.gate = Linear(hidden_size, moe.num_experts + int(has_shared), False, dtype, device)
        inter = moe.intermediate_size
        self.experts_gate_up = empty_parameter((moe.num_experts, 2 * inter, hidden_size),
                                               dtype, device)  # [E, 2 * inter, hidden]: [gate | up]
        self.experts_down = empty_parameter((moe.num_experts, hidden_size, inter),
                                            dtype, device)  # [E, hidden, inter]
        self.register_buffer("expert_range", torch.arange(moe.num_experts, device=device),
                             persistent=False)  # [E]
        self.shared_expert = (GatedMLP(hidden_size, moe.shared_expert_intermediate_size, False,
                                       dtype, device) if has_shared else None)
        # NOTE: on a GPU, grouped_mm has a native kernel for bf16 only; other dtypes fall back
        # to a loop that reads the offsets on the host, which a CUDA graph cannot capture.
        self.cuda_graph_safe = dtype == torch.bfloat16

    def route(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, E] logits -> (weights [T, k], expert ids [T, k]) exactly as transformers routes."""
        probs = router_logits.softmax(dim=-1, dtype=torch.float32)  # [T, E]
        weights, expert_ids = probs.topk(self.top_k, dim=-1)  # [T, k]
        if self.renormalize:
            weights /= weights.sum(dim=-1, keepdim=True)
        if not self.fp32_routing_weights:
            weights = weights.to(router_logits.dtype)
        return weights, expert_ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> [T, hidden]
        logits = self.gate(x)  # [T, E (+1)]
        weights, expert_ids = self.route(logits[:, : self.num_experts])
        # [T * k] (token, slot) pairs sorted by expert; stable keeps tokens in order per expert.
        sorted_ids, order = expert_ids.flatten().sort(stable=True)
        token_idx = order // self.top_k  # [T * k] source token of each sorted row
        # [E] end row of each expert's group; searchsorted needs no host sync (bincount would).
        offsets = torch.searchsorted(sorted_ids, self.expert_range, right=True, out_int32=True)
        sorted_x = x[token_idx]  # [T * k, hidden]
        gate_up = F.grouped_mm(sorted_x, self.experts_gate_up.transpose(1, 2),
                               offs=offsets)  # [T * k, 2 * inter]
        expert_out = F.grouped_mm(silu_and_mul(gate_up), self.experts_down.transpose(1, 2),
                                  offs=offsets)  # [T * k, hidden]
        expert_out = expert_out * weights.flatten()[order].unsqueeze(-1)
        out = torch.zeros_like(x).index_add_(0, token_idx, expert_out.to(x.dtype))  # [T, hidden]
        if self.shared_expert is not None:
            shared = self.shared_expert(x)  # [T, hidden]
            shared *= torch.sigmoid(logits[:, self.num_experts:])  # [T, 1] gate
            out += shared
        return out
