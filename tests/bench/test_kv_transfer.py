"""`ember bench kv-transfer` on a tiny pool: every backend, layout and pattern measured, the
blocks verified on arrival, the table printed."""

from ember.bench.kv_transfer import (
    KVTransferBenchConfig,
    kv_transfer_markdown,
    run_kv_transfer_bench,
)


def test_tiny_run_reports_every_backend_layout_and_pattern() -> None:
    cfg = KVTransferBenchConfig(num_layers=2, num_kv_heads=2, head_dim=16, num_blocks=32,
                                prompt_tokens=128, raw_mib=1, repeats=1, timeout_s=30.0)
    report = run_kv_transfer_bench(cfg)
    assert [b["backend"] for b in report["backends"]] == ["shm", "mooncake"]
    for entry in report["backends"]:
        rows = {(r["layout"], r["pattern"]): r for r in entry["patterns"]}
        assert set(rows) == {(layout, pattern) for layout in cfg.layouts
                             for pattern in cfg.patterns}
        head_major = [rows[("head-major", pattern)] for pattern in ("random", "consecutive")]
        assert head_major[0]["num_segments"] > head_major[1]["num_segments"]  # runs merge
        for row in rows.values():
            assert row["raw"]["gbps"] > 0
            assert row["whole"]["of_raw"] > 0 and row["per_layer"]["of_raw"] > 0
    table = kv_transfer_markdown(report)
    assert table.count("| mooncake |") == 4 and "layer by layer" in table
