"""Weights kept compressed in memory (keep_weights_compressed): the same outputs as the original
model, one decoded layer in memory, the loader decoding and allocating none of the kept weights,
clear errors where it cannot apply."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from ember import LLM, SamplingParams
from ember.compress import format as weights_format
from ember.compress import resident as resident_module
from ember.compress.compressor import compress_model_dir
from ember.compress.format import WeightsFile
from ember.compress.resident import make_resident
from ember.model.decoder import DecoderModel
from ember.model.layers import Linear
from ember.model.loader import find_weight_files, load_model
from tests.factories import tiny_model_dir

PROMPTS = ["Once upon a time", {"prompt_token_ids": [7, 3, 250, 11, 90]}]
WAYS = ["at load", "after a full load"]


def compressed_dir(root: Path, min_numel: int, architecture: str = "LlamaForCausalLM",
                   **overrides) -> tuple[Path, Path]:
    src = tiny_model_dir(root / "src", architecture, dtype="bfloat16", **overrides)
    out = root / "compressed"
    compress_model_dir(src, out, min_numel=min_numel, progress=False)
    return src, out


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> tuple[Path, Path]:
    return compressed_dir(tmp_path_factory.mktemp("resident"), 1024, num_layers=6)


@pytest.fixture(scope="module")
def partly_raw_dir(tmp_path_factory) -> Path:
    """k_proj and v_proj (2,048 elements) stay raw, so qkv_proj is only partly compressed."""
    return compressed_dir(tmp_path_factory.mktemp("partly"), 3000)[1]


@pytest.fixture(scope="module")
def moe_tied_dir(tmp_path_factory) -> Path:
    return compressed_dir(tmp_path_factory.mktemp("moe"), 1024, "Qwen2MoeForCausalLM",
                          tie_word_embeddings=True)[1]


def outputs(model_dir: Path, params: SamplingParams, **options) -> list:
    llm = LLM(str(model_dir), kv_cache_memory=8 << 20, **options)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs)
            for o in llm.generate(PROMPTS, params)]


def kept_model(model_dir: Path, way: str, **options) -> DecoderModel:
    """The model with its layer weights kept compressed: loaded so, or swapped after loading."""
    if way == "at load":
        return load_model(model_dir, keep_weights_compressed=True, **options)[0]
    model, _ = load_model(model_dir, **options)
    make_resident(model, find_weight_files(model_dir))
    return model


def assert_same_weights(plain: DecoderModel, kept: DecoderModel) -> None:
    """Bit for bit: every layer's parameters as its hooks leave them, the rest as loaded."""
    for layer_plain, layer_kept in reversed(list(zip(plain.layers, kept.layers, strict=True))):
        for hook in layer_kept._forward_pre_hooks.values():  # what calling the layer runs
            hook(layer_kept, ())
        for (name, want), (_, got) in zip(layer_plain.named_parameters(),
                                          layer_kept.named_parameters(), strict=True):
            assert torch.equal(want.view(torch.int16), got.view(torch.int16)), name
    for name, want in plain.named_parameters():
        if not name.startswith("layers."):
            assert torch.equal(want.view(torch.int16),
                               kept.get_parameter(name).view(torch.int16)), name
    for name, want in plain.named_buffers():
        assert torch.equal(want, kept.get_buffer(name)), name


def resident_linears(model: DecoderModel) -> list[Linear]:
    return [m for m in model.modules() if isinstance(m, Linear) and m.resident_weight]


def test_engine_outputs_match_the_original_model(dirs):
    src, compressed = dirs
    for params in (SamplingParams(max_tokens=12, temperature=0.0, logprobs=3),
                   SamplingParams(max_tokens=12, temperature=0.8, seed=3, n=2)):
        assert outputs(compressed, params, keep_weights_compressed=True) == \
            outputs(src, params)


@pytest.mark.parametrize("way", WAYS)
def test_layers_share_one_decoded_buffer(dirs, way):
    model = kept_model(dirs[1], way)
    pointers = {layer.self_attn.qkv_proj.weight.data_ptr() for layer in model.layers}
    assert len(pointers) == 1
    assert len(resident_linears(model)) == 6 * 4  # qkv, o, gate_up, down in each of 6 layers


def test_make_resident_accounts_for_memory(dirs):
    _, compressed = dirs
    model, _ = load_model(compressed)
    resident = make_resident(model, find_weight_files(compressed))
    assert resident.num_params == 6 * 4
    assert resident.compressed_bytes < 0.75 * resident.decoded_bytes
    assert resident.saved_bytes > 0


@pytest.mark.parametrize("way", WAYS)
def test_each_layer_sees_its_own_weights_when_it_runs(dirs, way):
    _, compressed = dirs
    assert_same_weights(load_model(compressed)[0], kept_model(compressed, way))


def test_partly_raw_parameters_load_as_before(partly_raw_dir):
    kept = kept_model(partly_raw_dir, "at load")
    assert {id(m) for m in resident_linears(kept)} == {
        id(m) for layer in kept.layers for m in (layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                                                 layer.mlp.down_proj)}
    assert len({layer.self_attn.qkv_proj.weight.data_ptr() for layer in kept.layers}) == 2
    assert_same_weights(load_model(partly_raw_dir)[0], kept)


def test_moe_experts_and_tied_embeddings(moe_tied_dir):
    kept = kept_model(moe_tied_dir, "at load")
    assert kept.lm_head.weight is kept.embed_tokens.weight
    assert len({layer.mlp.experts_gate_up.data_ptr() for layer in kept.layers}) == 1
    assert_same_weights(load_model(moe_tied_dir)[0], kept)


def counting(calls: list[str], fn, label: str):
    def counted(*args, **kwargs):
        calls.append(label)
        return fn(*args, **kwargs)

    return counted


def test_loader_decodes_no_weight_kept_compressed(dirs, monkeypatch):
    _, compressed = dirs
    stored = {}  # checkpoint name -> whether it is stored compressed
    for file in find_weight_files(compressed):
        with WeightsFile(file) as f:
            stored.update({name: name in f.entries for name in f.keys()})
    kept_names = {n for n, is_compressed in stored.items()
                  if is_compressed and n.startswith("model.layers.")}
    decoded_elsewhere = {n for n, is_compressed in stored.items() if is_compressed} - kept_names
    copied: list[str] = []
    decodes: list[str] = []
    real_copy = WeightsFile.copy_into

    def copy_into(f: WeightsFile, name: str, *args) -> None:
        copied.append(name)
        real_copy(f, name, *args)

    monkeypatch.setattr(WeightsFile, "copy_into", copy_into)
    monkeypatch.setattr(weights_format, "decode_bf16",
                        counting(decodes, weights_format.decode_bf16, "loader"))
    monkeypatch.setattr(resident_module, "decode_bf16",
                        counting(decodes, resident_module.decode_bf16, "layer refill"))

    load_model(compressed)
    assert kept_names <= set(copied)  # the plain load decodes them all
    copied.clear()
    decodes.clear()
    load_model(compressed, keep_weights_compressed=True)
    assert kept_names and kept_names.isdisjoint(copied)
    assert set(copied) == set(stored) - kept_names
    assert decodes == ["loader"] * len(decoded_elsewhere)  # embeddings and lm_head only


class AllocatedBytes(TorchFunctionMode):
    """Counts the bytes of the tensors torch's factories make off the meta device."""

    FACTORIES = {torch.empty, torch.empty_like, torch.empty_strided, torch.zeros,
                 torch.zeros_like, torch.ones, torch.full, torch.tensor, torch.arange}

    def __init__(self) -> None:
        super().__init__()
        self.nbytes = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.FACTORIES and isinstance(out, torch.Tensor) and not out.is_meta:
            self.nbytes += out.nbytes
        return out


def test_no_storage_is_allocated_for_weights_kept_compressed(dirs):
    _, compressed = dirs
    with AllocatedBytes() as plain:
        plain_model, plain_info = load_model(compressed)
    with AllocatedBytes() as kept:
        _, kept_info = load_model(compressed, keep_weights_compressed=True)
    resident = make_resident(plain_model, find_weight_files(compressed))
    assert plain.nbytes >= sum(p.nbytes for p in plain_model.parameters())
    # every layer's decoded storage is gone but for the one shared decoded layer
    assert kept.nbytes == plain.nbytes - resident.decoded_bytes + resident.scratch_bytes
    assert kept.nbytes < plain.nbytes - 0.8 * resident.decoded_bytes
    assert kept_info == plain_info


@pytest.mark.parametrize("way", WAYS)
def test_refuses_an_uncompressed_model_or_another_dtype(dirs, way):
    src, compressed = dirs
    with pytest.raises(ValueError, match="ember compress"):
        kept_model(src, way)
    with pytest.raises(ValueError, match="bfloat16"):
        kept_model(compressed, way, dtype="float32")
