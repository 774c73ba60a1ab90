"""`ember bench gpu`: its floor arithmetic, its report, and that the bench CLI loads on a GPU
image that has torch but none of the HTTP server's packages."""

from __future__ import annotations

import subprocess
import sys

from ember.bench.gpu_decode import LLAMA3_8B_SHAPE, decode_floor_bytes, gpu_bench_markdown
from ember.bench.models import count_parameters


def test_floor_counts_weights_once_and_every_sequences_kv():
    assert decode_floor_bytes(1000, 10, batch=4, context=50) == 1000 + 4 * 50 * 10


def test_llama3_8b_shape_has_eight_billion_parameters():
    s = LLAMA3_8B_SHAPE
    config = {"hidden_size": s["hidden_size"], "intermediate_size": s["intermediate_size"],
              "num_attention_heads": s["num_heads"], "num_key_value_heads": s["num_kv_heads"],
              "num_hidden_layers": s["num_layers"], "vocab_size": s["vocab_size"],
              "tie_word_embeddings": False}
    assert count_parameters(config)["total"] == 8_030_261_248  # Meta-Llama-3-8B's count


def test_report_shows_step_against_floor():
    row = {"batch": 1, "step_ms": 7.5, "step_min_ms": 7.4, "floor_ms": 5.0,
           "step_over_floor": 1.5, "graph_replay_ms": 6.5, "output_tok_s": 133.3}
    report = {"device": "GPU X", "copy_bandwidth_bytes_s": 3e12, "weight_bytes": 16e9,
              "enforce_eager": False, "decode": [row],
              "prefill": {"prompt_tokens": 4096, "tokens_per_s": 30000.0, "seconds": [0.14]}}
    text = gpu_bench_markdown(report)
    assert "| 1 | 7.50 | 7.40 | 5.00 | 1.50 | 6.50 | 133 |" in text
    assert "3.00 TB/s" in text and "4096-token prompt: 30000 tokens/s" in text


BLOCK_SERVER_PACKAGES = """
import importlib.abc, sys
missing = {"fastapi", "starlette", "pydantic", "uvicorn", "httptools", "zmq", "xgrammar",
           "openai", "jsonschema", "mooncake"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in missing:
            raise ImportError(f"no module named {name!r} (blocked)")
sys.meta_path.insert(0, Block())
from ember import LLM, SamplingParams
from ember.cli import build_parser
args = build_parser().parse_args(["bench", "gpu", "--batch-sizes", "1,32"])
assert args.batch_sizes == [1, 32], args
args = build_parser().parse_args(["bench", "compress-resident", "--device", "cuda"])
print("ok")
"""


def test_engine_and_bench_cli_import_without_the_servers_packages():
    out = subprocess.run([sys.executable, "-c", BLOCK_SERVER_PACKAGES], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
