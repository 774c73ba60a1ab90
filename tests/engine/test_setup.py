"""Engine set-up choices that depend on the device: the GPU's KV budget and CUDA-graph safety
(the card is faked: these are the arithmetic and the decisions, run on any machine)."""

from __future__ import annotations

import os

import pytest
import torch

from ember.config import EngineConfig
from ember.engine import setup
from ember.model.decoder import DecoderModel
from ember.model.loader import load_model
from tests.factories import tiny_model_dir

GIB = 2**30
PER_BLOCK = 1 << 20  # bytes of one KV block (16 tokens) in these cases


@pytest.fixture
def fake_gpu(monkeypatch):
    """A 80 GiB card: (free, this process's reserved) set per test."""
    card = {"free": 60 * GIB, "reserved": 16 * GIB}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (card["free"], 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: card["reserved"])
    return card


def _budget(**options) -> int:
    config = EngineConfig.from_options("unused", **options)
    return setup._kv_budget_bytes(config, torch.device("cuda"), PER_BLOCK, max_model_len=8192)


def test_gpu_budget_is_the_engines_share_less_its_own_memory(fake_gpu):
    # 0.9 of 80 GiB less the 16 GiB this process holds (weights), whatever others hold
    assert _budget(max_num_seqs=1024) == int(80 * GIB * 0.9) - 16 * GIB
    assert _budget(max_num_seqs=1024, gpu_memory_utilization=0.5) == 24 * GIB


def test_gpu_budget_is_capped_at_twice_what_the_sequences_can_fill(fake_gpu):
    # 2 x 4 sequences x 8192 tokens = 4096 blocks of 16 tokens
    assert _budget(max_num_seqs=4) == 4096 * PER_BLOCK


def test_gpu_budget_beyond_free_memory_names_the_option(fake_gpu):
    fake_gpu["free"] = 10 * GIB  # another process holds most of the card
    with pytest.raises(ValueError, match="gpu_memory_utilization=0.9 .* only 10.00 GiB"):
        _budget(max_num_seqs=1024)
    assert _budget(max_num_seqs=1024, kv_cache_memory=GIB) == GIB  # an explicit size wins


@pytest.mark.parametrize(("architecture", "dtype", "safe"), [
    ("LlamaForCausalLM", "float32", True),
    ("MixtralForCausalLM", "bfloat16", True),
    ("MixtralForCausalLM", "float32", False),
    ("Qwen3MoeForCausalLM", "float16", False),
])
def test_moe_outside_bf16_is_not_captured(tmp_path, architecture, dtype, safe):
    model, _ = load_model(tiny_model_dir(tmp_path, architecture, num_layers=1), dtype)
    assert isinstance(model, DecoderModel)
    assert setup._graph_safe(model) is safe


def test_onednn_keeps_a_primitive_per_token_count_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    setup.keep_gemm_primitives()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(
        setup.ONEDNN_PRIMITIVE_CACHE_CAPACITY)
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "2048")
    setup.keep_gemm_primitives()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "2048"
