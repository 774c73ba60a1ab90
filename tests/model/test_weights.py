"""Checkpoint-name mapping: aliases normalise to canonical names; fused slices tile each param."""

from __future__ import annotations

import transformers

from ember.model.registry import resolve_config
from ember.model.weights import checkpoint_targets, normalize_name

TINY = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}


def test_mixtral_names_normalise_to_canonical():
    assert (normalize_name("model.layers.3.block_sparse_moe.experts.12.w1.weight")
            == "model.layers.3.mlp.experts.12.gate_proj.weight")
    assert (normalize_name("model.layers.3.block_sparse_moe.experts.0.w2.weight")
            == "model.layers.3.mlp.experts.0.down_proj.weight")
    assert (normalize_name("model.layers.0.block_sparse_moe.gate.weight")
            == "model.layers.0.mlp.gate.weight")
    assert normalize_name("model.layers.0.mlp.w1.weight") == "model.layers.0.mlp.w1.weight"


def test_qkv_and_gate_up_slices_tile_their_params():
    cfg = resolve_config(transformers.LlamaConfig(**TINY, attention_bias=True), "LlamaForCausalLM")
    targets = checkpoint_targets(cfg)
    q, k, v = (targets[f"model.layers.1.self_attn.{n}_proj.bias"].index[0] for n in "qkv")
    assert (q.start, q.stop, k.stop, v.stop) == (0, 32, 48, 64)
    gate, up = (targets[f"model.layers.0.mlp.{n}_proj.weight"].index[0] for n in ("gate", "up"))
    assert (gate.stop, up.start, up.stop) == (64, 64, 128)


def test_moe_targets_cover_every_expert_and_the_fused_form():
    config = transformers.Qwen2MoeConfig(**TINY, num_experts=3, moe_intermediate_size=8,
                                         shared_expert_intermediate_size=16)
    targets = checkpoint_targets(resolve_config(config, "Qwen2MoeForCausalLM"))
    fused = targets["model.layers.1.mlp.experts.gate_up_proj"]
    assert fused.param == "layers.1.mlp.experts_gate_up" and len(fused.pieces) == 6
    assert all(piece in targets for piece in fused.pieces)
    assert targets["model.layers.1.mlp.experts.2.up_proj.weight"].index[0] == 2
    shared_gate = targets["model.layers.0.mlp.shared_expert_gate.weight"]
    assert shared_gate.param == "layers.0.mlp.gate.weight" and shared_gate.index[0] == slice(3, 4)
    assert "lm_head.weight" in targets
