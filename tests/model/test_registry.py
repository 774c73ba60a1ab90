"""Architecture lookup and config resolution: what each arch turns into, and what is refused."""

from __future__ import annotations

import pytest
import transformers

from ember.model.registry import (
    ARCHITECTURES,
    get_arch_spec,
    pick_architecture,
    resolve_config,
    resolve_rope,
)

TINY = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2}


def _resolve(architecture: str, **overrides):
    config = getattr(transformers, architecture).config_class(**{**TINY, **overrides})
    return resolve_config(config, architecture)


def test_unknown_architecture_names_it_and_lists_supported():
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as err:
        get_arch_spec("GPT2LMHeadModel")
    assert all(name in str(err.value) for name in ARCHITECTURES)
    with pytest.raises(ValueError, match="'FooForCausalLM', 'BarModel'.*LlamaForCausalLM"):
        pick_architecture(["FooForCausalLM", "BarModel"])
    with pytest.raises(ValueError, match="architectures"):
        pick_architecture(None)


def test_pick_architecture_takes_first_supported():
    assert pick_architecture(["Foo", "Qwen2ForCausalLM"]) == "Qwen2ForCausalLM"


def test_model_type_must_match_architecture():
    config = transformers.LlamaConfig(**TINY)
    with pytest.raises(ValueError, match="model_type"):
        resolve_config(config, "Qwen2ForCausalLM")


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_every_architecture_resolves(architecture):
    cfg = _resolve(architecture)
    assert cfg.num_layers == 4 and cfg.num_kv_heads == 2
    assert len(cfg.sliding_windows) == len(cfg.moe_layers) == 4
    assert len(cfg.rope.inv_freq) == cfg.head_dim // 2
    assert (cfg.moe is not None) == (ARCHITECTURES[architecture].moe is not None)


def test_biases_and_qk_norm_per_architecture():
    assert _resolve("Qwen2ForCausalLM").qkv_bias and not _resolve("Qwen2ForCausalLM").o_bias
    llama = _resolve("LlamaForCausalLM", attention_bias=True, mlp_bias=True)
    assert llama.qkv_bias and llama.o_bias and llama.mlp_bias
    assert not _resolve("MistralForCausalLM").qkv_bias
    assert _resolve("Qwen3ForCausalLM", head_dim=24).head_dim == 24
    assert _resolve("Qwen3ForCausalLM").qk_norm and not _resolve("Qwen2ForCausalLM").qk_norm
    assert not _resolve("Qwen2MoeForCausalLM", qkv_bias=False).qkv_bias


def test_sliding_windows():
    assert _resolve("MistralForCausalLM", sliding_window=8).sliding_windows == (8,) * 4
    assert _resolve("MistralForCausalLM", sliding_window=None).sliding_windows == (None,) * 4
    assert _resolve("LlamaForCausalLM").sliding_windows == (None,) * 4
    # Qwen2: only with use_sliding_window, and only on layers >= max_window_layers.
    assert _resolve("Qwen2ForCausalLM", sliding_window=8).sliding_windows == (None,) * 4
    qwen2 = _resolve("Qwen2ForCausalLM", use_sliding_window=True, sliding_window=8,
                     max_window_layers=2)
    assert qwen2.sliding_windows == (None, None, 8, 8)
    # Qwen2-MoE writes sliding_window=0 when it is off.
    assert _resolve("Qwen2MoeForCausalLM").sliding_windows == (None,) * 4
    assert _resolve("Qwen3MoeForCausalLM", sliding_window=8).sliding_windows == (None,) * 4


def test_moe_resolution():
    mixtral = _resolve("MixtralForCausalLM", num_local_experts=8, num_experts_per_tok=2)
    assert mixtral.moe.num_experts == 8 and mixtral.moe.renormalize
    assert mixtral.moe.fp32_routing_weights and mixtral.moe_layers == (True,) * 4
    qwen = _resolve("Qwen2MoeForCausalLM", num_experts=6, num_experts_per_tok=2,
                    moe_intermediate_size=16, shared_expert_intermediate_size=48,
                    decoder_sparse_step=2, mlp_only_layers=[1], norm_topk_prob=False)
    assert qwen.moe.intermediate_size == 16 and qwen.moe.shared_expert_intermediate_size == 48
    assert not qwen.moe.renormalize and not qwen.moe.fp32_routing_weights
    assert qwen.moe_layers == (False, False, False, True)  # (i+1) % 2 == 0, minus layer 1
    qwen3 = _resolve("Qwen3MoeForCausalLM", num_experts=4, mlp_only_layers=[0])
    assert qwen3.moe.shared_expert_intermediate_size == 0
    assert qwen3.moe_layers == (False, True, True, True)


def test_rope_matches_transformers_rotary_embedding():
    import torch
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    for rope in ({"rope_type": "default", "rope_theta": 5e5},
                 {"rope_type": "linear", "factor": 3.0},
                 {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                 {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}):
        config = transformers.LlamaConfig(**TINY, rope_parameters=rope)
        ours = resolve_rope(config, 8)
        theirs = LlamaRotaryEmbedding(config)
        assert torch.equal(torch.tensor(ours.inv_freq), theirs.inv_freq), rope
        assert ours.attention_scaling == pytest.approx(theirs.attention_scaling)


@pytest.mark.parametrize("rope", [{"rope_type": "dynamic", "factor": 2.0},
                                  {"type": "dynamic", "factor": 2.0}])
def test_dynamic_rope_is_refused(rope):
    config = transformers.LlamaConfig(**TINY, rope_scaling=rope)
    with pytest.raises(ValueError, match="'dynamic'.*not supported"):
        resolve_config(config, "LlamaForCausalLM")


def test_unsupported_activation_is_refused():
    with pytest.raises(ValueError, match="hidden_act.*gelu"):
        _resolve("LlamaForCausalLM", hidden_act="gelu")
