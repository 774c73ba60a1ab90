"""`ember bench compress-resident`: a tiny run end to end (no timing assertions)."""

from __future__ import annotations

from ember.bench.compress.resident import (
    ResidentBenchConfig,
    resident_markdown,
    run_resident_bench,
)
from tests.factories import tiny_model_dir


def test_tiny_run_reports_both_modes_and_the_memory_saved(tmp_path):
    model = tiny_model_dir(tmp_path, dtype="bfloat16", num_layers=6, hidden_size=128,
                           intermediate_size=512)
    cfg = ResidentBenchConfig(original=model, batch_sizes=(1, 3), input_len=8, output_len=4,
                              repeats=1, engine_options=(("kv_cache_memory", 8 << 20),))
    report = run_resident_bench(cfg)
    assert [r["batch"] for r in report["runs"]] == [1, 3]
    for run in report["runs"]:
        assert run["original_tok_s"] > 0 and run["kept_compressed_tok_s"] > 0
    memory = report["memory"]
    assert memory["layer_bytes_compressed"] < memory["layer_bytes"]
    assert 0 < memory["saved_bytes"] < memory["model_bytes"]
    assert "| 3 |" in resident_markdown(report)
