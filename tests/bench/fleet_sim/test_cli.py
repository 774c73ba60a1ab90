"""`ember bench fleet-sim` from argv to the JSON report and its markdown tables."""

from __future__ import annotations

import argparse
import json

from ember.bench.fleet_sim.cli import add_fleet_sim_parser
from ember.bench.fleet_sim.step_model import StepModel


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_fleet_sim_parser(parser.add_subparsers(dest="cmd", required=True))
    return parser.parse_args(argv)


def test_tiny_sweep_writes_report_and_tables(tmp_path, capsys):
    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps(
        {"step_model": StepModel(0.005, 1e-4, 1e-8, 5e-4, 1e-7).to_json()}))
    out = tmp_path / "out"
    args = _parse(["fleet-sim", "--calibration", str(calibration), "--workers", "2,3",
                   "--loads", "0.8", "--sessions-per-worker", "3", "--turns", "3",
                   "--system-prompt-len", "64", "--input-len", "16", "--output-len", "4",
                   "--kv-tokens", "4096", "--capacity-requests", "30", "--out", str(out)])
    assert args.func(args) == 0
    report = json.loads((out / "fleet_sim.json").read_text())
    assert [(r["num_workers"], r["load"]) for r in report["runs"]] == [(2, 0.8), (3, 0.8)]
    for run in report["runs"]:
        assert len(run["results"]) == 5
        assert all(r["num_requests"] == run["num_workers"] * 3 * 3 for r in run["results"])
    assert {t["policy"] for t in report["targets"]} == {"ember_no_header", "ember_header"}
    markdown = (out / "fleet_sim.md").read_text()
    assert "| ember_header |" in markdown and "### 3 workers, load 0.8" in markdown
    assert markdown in capsys.readouterr().out


def test_unknown_policy_is_refused_by_name(tmp_path):
    calibration = tmp_path / "c.json"
    calibration.write_text(json.dumps(
        {"step_model": StepModel(0.005, 1e-4, 1e-8, 5e-4, 1e-7).to_json()}))
    args = _parse(["fleet-sim", "--calibration", str(calibration), "--policies", "random"])
    try:
        args.func(args)
    except ValueError as err:
        assert "random" in str(err)
    else:
        raise AssertionError("an unknown policy was accepted")


def test_missing_calibration_says_how_to_make_one(tmp_path):
    args = _parse(["fleet-sim", "--calibration", str(tmp_path / "none.json")])
    try:
        args.func(args)
    except FileNotFoundError as err:
        assert "fleet-sim-calibrate" in str(err)
    else:
        raise AssertionError("ran without a calibration")
