"""`ember bench gemm`: the shapes it takes from a config and the report it writes (no timing
assertions: only that every implementation ran and its numbers are finite)."""

from __future__ import annotations

import math

import torch

from ember.bench.gemm import gemm_markdown, linear_shapes, time_shape

LLAMA = {"hidden_size": 256, "intermediate_size": 768, "num_attention_heads": 8,
         "num_key_value_heads": 4, "head_dim": 32, "vocab_size": 32000}


def test_linear_shapes_follow_the_config():
    assert linear_shapes(LLAMA) == {
        "qkv_proj": (512, 256), "o_proj": (256, 256), "gate_up_proj": (1536, 256),
        "down_proj": (256, 768), "lm_head": (32000, 256)}
    no_head_dim = {**LLAMA, "head_dim": None, "num_key_value_heads": 8}
    assert linear_shapes(no_head_dim)["qkv_proj"] == (768, 256)


def test_time_shape_runs_every_implementation_and_reports():
    weight = torch.randn(40, 24).bfloat16()
    ms = time_shape(weight, rows=3, repeats=2)
    assert set(ms) == {"ember bf16", "oneDNN fp32", "torch bf16"}
    assert all(math.isfinite(v) and v > 0 for v in ms.values())
    report = {"model": "tiny", "num_threads": torch.get_num_threads(), "repeats": 2,
              "results": [{"layer": "o_proj", "out_features": 40, "in_features": 24, "rows": 3,
                           "ms": ms, "gflops": {k: 1.0 for k in ms}}]}
    table = gemm_markdown(report)
    assert "| o_proj | 40×24 | 3 |" in table and "ember bf16 / oneDNN fp32" in table
