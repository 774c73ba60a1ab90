"""Loading HF model dirs: layouts (sharded, fused MoE), dtypes, ModelInfo, and every bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ember.model.loader import find_weight_files, load_model, load_weights
from tests.factories import tiny_model_dir


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("loader"), "LlamaForCausalLM")


@pytest.fixture
def broken_dir(llama_dir, tmp_path):
    """A private copy of the llama dir that a test may damage."""
    return shutil.copytree(llama_dir, tmp_path / "model")


def _state(model):
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


def _assert_same_weights(a, b):
    state_a, state_b = _state(a), _state(b)
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name


def test_model_info(llama_dir):
    model, info = load_model(llama_dir)
    assert info.architecture == "LlamaForCausalLM"
    assert (info.num_layers, info.num_heads, info.num_kv_heads, info.head_dim) == (2, 4, 2, 16)
    assert (info.hidden_size, info.vocab_size) == (64, 1024)
    assert info.max_position_embeddings == 2048
    assert info.dtype == torch.float32
    assert info.eos_token_ids == [4]  # the tokenizer's <|im_end|>
    assert info.num_params == sum(p.numel() for p in model.parameters())


def test_params_fused_and_filled_exactly(llama_dir):
    model, _ = load_model(llama_dir)
    weights = load_file(str(llama_dir / "model.safetensors"))
    qkv = model.layers[1].self_attn.qkv_proj.weight
    expected = torch.cat([weights[f"model.layers.1.self_attn.{n}_proj.weight"] for n in "qkv"])
    assert torch.equal(qkv, expected)
    gate_up = model.layers[0].mlp.gate_up_proj.weight
    expected = torch.cat([weights[f"model.layers.0.mlp.{n}_proj.weight"] for n in ("gate", "up")])
    assert torch.equal(gate_up, expected)


def test_sharded_checkpoint_loads_the_same(llama_dir, tmp_path):
    sharded = tiny_model_dir(tmp_path, "LlamaForCausalLM", shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    _assert_same_weights(load_model(sharded)[0], load_model(llama_dir)[0])


def test_tied_embeddings_share_one_tensor(tmp_path):
    model, info = load_model(tiny_model_dir(tmp_path, tie_word_embeddings=True))
    assert model.lm_head.weight is model.embed_tokens.weight
    assert info.num_params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("architecture", ["MixtralForCausalLM", "Qwen2MoeForCausalLM"])
def test_moe_fused_layout_loads_like_per_expert(architecture, tmp_path):
    """transformers 5 writes per-expert tensors by default, its fused [E, ...] ones on request."""
    import transformers

    per_expert = tiny_model_dir(tmp_path, architecture, name="per_expert")
    names = load_file(str(per_expert / "model.safetensors")).keys()
    assert any(".experts.0." in n for n in names)
    hf = getattr(transformers, architecture).from_pretrained(per_expert)
    fused = tmp_path / "fused"
    shutil.copytree(per_expert, fused)
    (fused / "model.safetensors").unlink()
    hf.save_pretrained(fused, save_original_format=False)
    assert "model.layers.0.mlp.experts.gate_up_proj" in load_file(str(fused / "model.safetensors"))
    _assert_same_weights(load_model(fused)[0], load_model(per_expert)[0])


def test_dtype_auto_takes_config_and_explicit_casts(tmp_path, llama_dir):
    bf16_dir = tiny_model_dir(tmp_path, dtype="bfloat16")
    model, info = load_model(bf16_dir)
    assert info.dtype == torch.bfloat16
    cast, cast_info = load_model(llama_dir, dtype="bfloat16")
    assert cast_info.dtype == torch.bfloat16
    _assert_same_weights(model, cast)
    assert load_model(bf16_dir, dtype="float32")[1].dtype == torch.float32
    # No dtype in config.json: the checkpoint's own dtype.
    config = json.loads((bf16_dir / "config.json").read_text())
    del config["dtype"]
    (bf16_dir / "config.json").write_text(json.dumps(config))
    assert load_model(bf16_dir)[1].dtype == torch.bfloat16
    config["torch_dtype"] = "float16"  # the pre-v5 key
    (bf16_dir / "config.json").write_text(json.dumps(config))
    assert load_model(bf16_dir)[1].dtype == torch.float16
    with pytest.raises(ValueError, match="dtype"):
        load_model(llama_dir, dtype="float64")


def test_eos_ids_merge_config_and_generation_config(broken_dir):
    (broken_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [4, 2]}))
    assert load_model(broken_dir)[1].eos_token_ids == [4, 2]


def test_legacy_rope_scaling_key_is_normalised_by_transformers(broken_dir):
    config = json.loads((broken_dir / "config.json").read_text())
    del config["rope_parameters"]
    config["rope_theta"] = 500.0
    config["rope_scaling"] = {"type": "linear", "factor": 2.0}
    (broken_dir / "config.json").write_text(json.dumps(config))
    model, _ = load_model(broken_dir)
    expected = 1.0 / (500.0 ** (torch.arange(0, 16, 2).float() / 16)) / 2.0
    torch.testing.assert_close(model.rotary.inv_freq, expected)


# --- bad input: every case is a ValueError naming the file, tensor or field ---------------


def _rewrite_weights(model_dir, edit):
    path = model_dir / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_dir(tmp_path):
    with pytest.raises(ValueError, match="nope.*does not exist"):
        load_model(tmp_path / "nope")


def test_missing_config(broken_dir):
    (broken_dir / "config.json").unlink()
    with pytest.raises(ValueError, match="config.json"):
        load_model(broken_dir)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", ""])
def test_malformed_config(broken_dir, text):
    (broken_dir / "config.json").write_text(text)
    with pytest.raises(ValueError, match="config.json"):
        load_model(broken_dir)


def test_config_transformers_rejects(broken_dir):
    config = json.loads((broken_dir / "config.json").read_text())
    del config["model_type"]
    (broken_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json"):
        load_model(broken_dir)


def test_unknown_architecture(broken_dir):
    config = json.loads((broken_dir / "config.json").read_text())
    config["architectures"] = ["GPTNeoXForCausalLM"]
    (broken_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="GPTNeoXForCausalLM.*LlamaForCausalLM"):
        load_model(broken_dir)


def test_no_weights(broken_dir):
    (broken_dir / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no weights"):
        load_model(broken_dir)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "consolidated.pth", "model.pt"])
def test_pickled_weights_are_refused_never_loaded(broken_dir, name, monkeypatch):
    (broken_dir / "model.safetensors").unlink()
    (broken_dir / name).write_bytes(b"\x80\x04not really a pickle")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(ValueError, match=f"{name}.*never unpickles"):
        load_model(broken_dir)


def test_missing_tensor(broken_dir):
    _rewrite_weights(broken_dir, lambda t: t.pop("model.layers.1.self_attn.v_proj.weight"))
    with pytest.raises(ValueError, match="missing tensor 'model.layers.1.self_attn.v_proj.weight'"):
        load_model(broken_dir)


def test_shape_mismatch(broken_dir):
    def shrink(tensors):
        tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(100, 64)

    _rewrite_weights(broken_dir, shrink)
    with pytest.raises(ValueError, match=r"model.safetensors.*up_proj.weight.*\[100, 64\]"):
        load_model(broken_dir)


def test_skipped_params_are_checked_but_not_copied(llama_dir, broken_dir):
    """What keep_weights_compressed relies on: the loader leaves a skipped parameter alone."""
    model, _ = load_model(llama_dir)
    files = find_weight_files(llama_dir)
    skipped = "layers.0.mlp.gate_up_proj.weight"
    with torch.no_grad():
        model.get_parameter(skipped).fill_(7.0)
        load_weights(model, files, skip={skipped})
    assert bool((model.get_parameter(skipped) == 7.0).all())
    _assert_same_weights(model.layers[1], load_model(llama_dir)[0].layers[1])

    def shrink(tensors):
        tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(100, 64)

    _rewrite_weights(broken_dir, shrink)
    with pytest.raises(ValueError, match=r"up_proj.weight.*\[100, 64\]"):
        load_weights(model, find_weight_files(broken_dir), skip={skipped})


def test_unexpected_tensor(broken_dir):
    def add(tensors):
        tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)

    _rewrite_weights(broken_dir, add)
    with pytest.raises(ValueError, match=r"unexpected tensor 'model.layers.0.self_attn.q_proj"):
        load_model(broken_dir)


def test_corrupt_safetensors(broken_dir):
    (broken_dir / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(broken_dir)


def test_sharded_index_problems(tmp_path):
    sharded = tiny_model_dir(tmp_path, "LlamaForCausalLM", shard_size="100KB")
    index = sharded / "model.safetensors.index.json"
    shard = sorted(sharded.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ValueError, match=shard.name):
        load_model(sharded)
    index.write_text("{}")
    with pytest.raises(ValueError, match="model.safetensors.index.json"):
        load_model(sharded)
