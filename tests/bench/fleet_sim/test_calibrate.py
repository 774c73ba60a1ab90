"""Calibration against the real engine on a tiny model: every scenario's steps are recorded
with what they computed, repeats line up step by step, and the fit is saved and loads back."""

from __future__ import annotations

from ember.bench.fleet_sim.calibrate import CalibrationConfig, run_calibration, write_calibration
from ember.bench.fleet_sim.step_model import StepModel, load_calibration
from tests.factories import tiny_model_dir


def test_tiny_calibration_round_trip(tmp_path):
    cfg = CalibrationConfig(model_dir=tiny_model_dir(tmp_path), max_num_batched_tokens=32,
                            kv_cache_gib=0.01, prefill_lens=(8, 40), decode_grid=((1, 24),
                                                                                   (4, 24)),
                            decode_steps=3, num_mixed=3, mixed_prompt_lens=(8, 60),
                            mixed_output_lens=(2, 4), repeats=2)
    record = run_calibration(cfg)
    rows = record["steps"]["rows"]
    kinds = {row[0] for row in rows}
    assert kinds == {"prefill", "decode", "mixed"}
    prefill_tokens = sum(row[2] for row in rows if row[0] == "prefill")
    assert prefill_tokens == 8 + 40  # one repeat's steps, each at its fastest
    decode_seqs = sum(row[4] for row in rows if row[0] == "decode")
    assert decode_seqs == (1 + 4) * 2  # the first token comes with the prefill
    assert all(row[1] > 0 for row in rows)
    path = tmp_path / "calibration.json"
    write_calibration(record, path)
    model, saved = load_calibration(path)
    assert model == StepModel.from_json(record["step_model"])
    assert saved["engine"]["model"]["kv_bytes_per_token"] > 0
