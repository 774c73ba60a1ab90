"""Weights kept compressed in memory (keep_weights_compressed): the same outputs as the original
model, one decoded layer in memory, clear errors where it cannot apply."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ember import LLM, SamplingParams
from ember.compress.compressor import compress_model_dir
from ember.compress.resident import make_resident
from ember.model.loader import find_weight_files, load_model
from tests.factories import tiny_model_dir

PROMPTS = ["Once upon a time", {"prompt_token_ids": [7, 3, 250, 11, 90]}]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("resident")
    src = tiny_model_dir(root / "src", dtype="bfloat16", num_layers=6)
    out = root / "compressed"
    compress_model_dir(src, out, min_numel=1024, progress=False)
    return src, out


def outputs(model_dir: Path, params: SamplingParams, **options) -> list:
    llm = LLM(str(model_dir), kv_cache_memory=8 << 20, **options)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs)
            for o in llm.generate(PROMPTS, params)]


def test_engine_outputs_match_the_original_model(dirs):
    src, compressed = dirs
    for params in (SamplingParams(max_tokens=12, temperature=0.0, logprobs=3),
                   SamplingParams(max_tokens=12, temperature=0.8, seed=3, n=2)):
        assert outputs(compressed, params, keep_weights_compressed=True) == \
            outputs(src, params)


def test_layers_share_one_decoded_buffer(dirs):
    _, compressed = dirs
    model, _ = load_model(compressed)
    resident = make_resident(model, find_weight_files(compressed))
    pointers = {layer.self_attn.qkv_proj.weight.data_ptr() for layer in model.layers}
    assert len(pointers) == 1
    assert resident.num_params == 6 * 4  # qkv, o, gate_up, down in each of 6 layers
    assert resident.compressed_bytes < 0.75 * resident.decoded_bytes
    assert resident.saved_bytes > 0


def test_each_layer_sees_its_own_weights_when_it_runs(dirs):
    _, compressed = dirs
    plain, _ = load_model(compressed)
    kept, _ = load_model(compressed)
    make_resident(kept, find_weight_files(compressed))
    for layer_plain, layer_kept in reversed(list(zip(plain.layers, kept.layers, strict=True))):
        for hook in layer_kept._forward_pre_hooks.values():  # what calling the layer runs
            hook(layer_kept, ())
        for (name, want), (_, got) in zip(layer_plain.named_parameters(),
                                          layer_kept.named_parameters(), strict=True):
            assert torch.equal(want.view(torch.int16), got.view(torch.int16)), name


def test_refuses_an_uncompressed_model_or_another_dtype(dirs, tmp_path):
    src, compressed = dirs
    model, _ = load_model(src)
    with pytest.raises(ValueError, match="ember compress"):
        make_resident(model, find_weight_files(src))
    model, _ = load_model(compressed, dtype="float32")
    with pytest.raises(ValueError, match="bfloat16"):
        make_resident(model, find_weight_files(compressed))
