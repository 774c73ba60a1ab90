"""`ember bench compress` end to end on a tiny BF16 model, zipnn and DFloat11 included: every
round trip bit-exact, ember's size at the entropy bound, the report's fields and tables."""

from __future__ import annotations

import argparse
import json

from ember.bench.compress.cli import add_compress_bench_parser
from ember.compress.compressor import MIN_NUMEL
from tests.factories import tiny_model_dir


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_compress_bench_parser(parser.add_subparsers(dest="cmd", required=True))
    return parser.parse_args(argv)


def test_tiny_model_end_to_end(tmp_path, capsys):
    model = tiny_model_dir(tmp_path, dtype="bfloat16", name="tiny", hidden_size=128,
                           intermediate_size=512, num_layers=1)
    out = tmp_path / "results" / "compress.json"
    args = _parse(["compress", "--model", str(model), "--no-minilm", "--no-demo",
                   "--load-model-size", "none", "--dfloat11-max-numel", "100000",
                   "--repeats", "1", "--load-repeats", "1", "--work-dir", str(tmp_path / "work"),
                   "--out", str(out)])
    assert args.func(args) == 0
    report = json.loads(out.read_text())
    assert report["skipped_competitors"] == {}
    (measured,) = report["models"]
    assert measured["name"] == "tiny"
    assert len(measured["tensors"]) == 9  # embed, lm_head, q/k/v/o, gate/up/down; no norms
    for row in measured["tensors"]:
        assert row["is_exact"] == {"ember": True, "zipnn": True, "dfloat11": True}, row["name"]
        assert row["bound_bytes"] < row["original_bytes"]
        numel = row["original_bytes"] // 2
        if numel >= MIN_NUMEL:
            assert row["sizes"]["ember"] <= 1.01 * row["bound_bytes"], row["name"]
        if numel > 100_000:
            assert 0 < row["dfloat11_sampled_numel"] <= 100_000
    codecs = measured["totals"]["codecs"]
    assert set(codecs) == {"ember", "zipnn", "dfloat11"}
    assert codecs["dfloat11"]["num_sampled_tensors"] == 2  # the embedding and the LM head
    for codec in codecs.values():
        assert codec["bytes"] < measured["totals"]["original_bytes"] and codec["is_exact"]
    assert set(measured["speed"]) == {"ember_1_thread", "ember_all_threads", "zipnn_1_thread"}
    assert all(s["compress_gbps"] > 0 and s["decompress_gbps"] > 0
               for s in measured["speed"].values())

    (load,) = report["load"]
    assert load["is_decoder"] and set(load["ops"]) == {"read", "tensors", "load_model"}
    assert load["bytes"]["ember"] < load["bytes"]["bf16"]
    assert set(load["cache_drop"]) == {"cold_read_s", "warm_read_s", "is_verified"}
    for op in load["ops"].values():
        assert op["ratio"] > 0 and len(op["bf16"]["cold_s"]) == len(op["ember"]["cold_s"]) == 1
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())

    markdown = out.with_suffix(".md").read_text()
    assert "| tiny | 9 |" in markdown and "estimated from evenly spaced rows" in markdown
    assert markdown in capsys.readouterr().out
