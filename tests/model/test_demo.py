"""Random-model directories: what build_random_model writes, and the cached demo model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ember.model import demo
from ember.model.loader import load_model
from ember.model.tokenizer import load_tokenizer
from tests.factories import tiny_model_dir


def test_build_writes_a_complete_hf_dir(tmp_path):
    model_dir = tiny_model_dir(tmp_path, "Qwen3ForCausalLM", num_layers=1)
    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors",
            "tokenizer.json", "tokenizer_config.json"} <= names
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["head_dim"] == 16
    tokenizer = load_tokenizer(model_dir)
    assert tokenizer.eos_token_id == config["eos_token_id"]
    assert len(tokenizer) <= config["vocab_size"]
    generation = json.loads((model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == config["eos_token_id"]


def test_same_seed_same_weights_and_norms_are_randomised(tmp_path):
    a = load_file(str(tiny_model_dir(tmp_path, name="a", seed=3) / "model.safetensors"))
    b = load_file(str(tiny_model_dir(tmp_path, name="b", seed=3) / "model.safetensors"))
    c = load_file(str(tiny_model_dir(tmp_path, name="c", seed=4) / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])
    assert not torch.equal(a["model.norm.weight"], torch.ones(64))  # tests must see the norms


def test_unknown_architecture_and_dtype(tmp_path):
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        demo.build_random_model(tmp_path, "GPT2LMHeadModel")
    with pytest.raises(ValueError, match="dtype"):
        demo.build_random_model(tmp_path, dtype="int8")


def test_demo_model_is_built_once_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path))
    calls = []
    real_build = demo.build_random_model

    def small_build(out_dir, **recipe):
        calls.append(recipe)
        assert not (tmp_path / "models" / demo.DEMO_MODEL_NAME).exists()  # built aside
        return real_build(out_dir, recipe["architecture"], dtype=recipe["dtype"])

    monkeypatch.setattr(demo, "build_random_model", small_build)
    first = demo.demo_model_dir()
    assert first == tmp_path / "models" / demo.DEMO_MODEL_NAME
    assert demo.demo_model_dir() == first and len(calls) == 1  # reused
    assert [p.name for p in first.parent.iterdir()] == [demo.DEMO_MODEL_NAME]  # no temp left
    assert calls == [demo.DEMO_MODEL_RECIPE]
    assert load_model(first)[1].dtype == torch.bfloat16


def test_demo_model_recipe_is_about_ten_million_params():
    """The recipe's size from its config alone (building it trains a 32k tokenizer, ~12 s)."""
    import transformers

    recipe = dict(demo.DEMO_MODEL_RECIPE)
    model_cls = getattr(transformers, recipe.pop("architecture"))
    assert recipe.pop("dtype") == "bfloat16" and recipe["vocab_size"] == 32000
    config = model_cls.config_class(
        num_hidden_layers=recipe.pop("num_layers"), num_attention_heads=recipe.pop("num_heads"),
        num_key_value_heads=recipe.pop("num_kv_heads"), **recipe)
    with torch.device("meta"):
        model = model_cls(config)
    assert 8e6 <= sum(p.numel() for p in model.parameters()) <= 12e6


def test_a_tokenizer_smaller_than_the_vocabulary(tmp_path):
    """Big-vocabulary bench models train a small tokenizer; ids past it exist but are unused."""
    model_dir = tiny_model_dir(tmp_path, vocab_size=2048, tokenizer_vocab_size=1024,
                               init_device="cpu")
    config = json.loads((model_dir / "config.json").read_text())
    assert config["vocab_size"] == 2048
    assert len(load_tokenizer(model_dir)) <= 1024
    model, info = load_model(model_dir)
    assert info.vocab_size == 2048 and model.embed_tokens.weight.shape[0] == 2048
