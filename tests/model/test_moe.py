"""The sparse MoE block vs transformers' own MoE blocks, on the same random weights."""

from __future__ import annotations

import pytest
import torch
import transformers

from ember.model.moe import SparseMoE
from ember.model.registry import MoEConfig

HIDDEN, INTER, SHARED = 32, 24, 40


def _hf_block(architecture: str, **overrides):
    """transformers' sparse block for `architecture` with random weights, and its MoEConfig."""
    config = getattr(transformers, architecture).config_class(
        hidden_size=HIDDEN, intermediate_size=INTER, moe_intermediate_size=INTER,
        shared_expert_intermediate_size=SHARED, num_attention_heads=4, **overrides)
    if architecture == "MixtralForCausalLM":
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block
        moe = MoEConfig(config.num_local_experts, config.num_experts_per_tok, INTER, True, True)
    else:
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
        shared = SHARED if architecture == "Qwen2MoeForCausalLM" else 0
        Block = Qwen2MoeSparseMoeBlock if shared else Qwen3MoeSparseMoeBlock
        moe = MoEConfig(config.num_experts, config.num_experts_per_tok, INTER,
                        bool(config.norm_topk_prob), False, shared)
    torch.manual_seed(0)
    block = Block(config)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0, 0.3)
    return block.eval(), moe


def _ember_block(block, moe: MoEConfig) -> SparseMoE:
    ours = SparseMoE(HIDDEN, moe, torch.float32, "cpu")
    with torch.no_grad():
        ours.gate.weight[: moe.num_experts] = block.gate.weight
        ours.experts_gate_up.copy_(block.experts.gate_up_proj)
        ours.experts_down.copy_(block.experts.down_proj)
        if moe.shared_expert_intermediate_size:
            ours.gate.weight[moe.num_experts:] = block.shared_expert_gate.weight
            shared = block.shared_expert
            ours.shared_expert.gate_up_proj.weight.copy_(
                torch.cat([shared.gate_proj.weight, shared.up_proj.weight]))
            ours.shared_expert.down_proj.weight.copy_(shared.down_proj.weight)
    return ours


CASES = [
    ("MixtralForCausalLM", {"num_local_experts": 8, "num_experts_per_tok": 2}),
    ("Qwen2MoeForCausalLM", {"num_experts": 8, "num_experts_per_tok": 2}),
    ("Qwen2MoeForCausalLM", {"num_experts": 6, "num_experts_per_tok": 3, "norm_topk_prob": True}),
    ("Qwen3MoeForCausalLM", {"num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": True}),
    ("Qwen3MoeForCausalLM", {"num_experts": 5, "num_experts_per_tok": 1}),
]


@pytest.mark.parametrize("num_tokens", [1, 3, 64])
@pytest.mark.parametrize("architecture,overrides", CASES)
def test_block_matches_transformers(architecture, overrides, num_tokens):
    block, moe = _hf_block(architecture, **overrides)
    ours = _ember_block(block, moe)
    x = torch.randn(num_tokens, HIDDEN)
    with torch.inference_mode():
        expected = block(x.unsqueeze(0))[0]
        got = ours(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_routing_matches_transformers_router():
    block, moe = _hf_block("Qwen3MoeForCausalLM", num_experts=8, num_experts_per_tok=3,
                           norm_topk_prob=True)
    ours = _ember_block(block, moe)
    x = torch.randn(50, HIDDEN)
    with torch.inference_mode():
        logits, weights, ids = block.gate(x)
        our_weights, our_ids = ours.route(logits)
    assert torch.equal(our_ids, ids)
    torch.testing.assert_close(our_weights, weights, atol=0, rtol=0)


def test_experts_without_tokens_and_bf16():
    block, moe = _hf_block("MixtralForCausalLM", num_local_experts=16, num_experts_per_tok=2)
    ours = _ember_block(block, moe).to(torch.bfloat16)
    block = block.to(torch.bfloat16)
    x = torch.randn(2, HIDDEN, dtype=torch.bfloat16)  # 4 of 16 experts used at most
    with torch.inference_mode():
        torch.testing.assert_close(ours(x), block(x.unsqueeze(0))[0], atol=2e-2, rtol=2e-2)
