"""`ember bench fleet-sim` and `ember bench fleet-sim-calibrate`: argument parsing only.

ember/bench/cli.py adds both with `add_fleet_sim_parser`; nothing else here reads argv.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ember.bench.fleet_sim.config import POLICY_SPECS, SweepConfig, TraceConfig, WorkerConfig

DEFAULT_CALIBRATION = Path("benchmarks/fleet-sim/calibration.json")


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _ints(value: str) -> tuple[int, ...]:
    return tuple(int(v) for v in _csv(value))


def _floats(value: str) -> tuple[float, ...]:
    return tuple(float(v) for v in _csv(value))


def cmd_fleet_sim(args: argparse.Namespace) -> int:
    from ember.bench.fleet_sim.report import to_markdown
    from ember.bench.fleet_sim.run import run_sweep
    from ember.bench.fleet_sim.step_model import load_calibration

    step_model, calibration = load_calibration(args.calibration)
    sweep = SweepConfig(fleet_sizes=args.workers, loads=args.loads, policies=args.policies,
                        sessions_per_worker=args.sessions_per_worker,
                        decode_weight=args.decode_weight,
                        capacity_requests=args.capacity_requests, seed=args.seed)
    trace = TraceConfig(turns=args.turns, system_prompt_len=args.system_prompt_len,
                        input_len=args.input_len, output_len=args.output_len,
                        range_ratio=args.range_ratio, think_time_s=args.think_time_s,
                        seed=args.seed)
    worker = WorkerConfig(kv_tokens=args.kv_tokens, max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens)
    report = run_sweep(sweep, trace, worker, step_model, calibration)
    report["calibration_path"] = str(args.calibration)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fleet_sim.json").write_text(json.dumps(report, indent=1) + "\n")
    markdown = to_markdown(report)
    (args.out / "fleet_sim.md").write_text(markdown)
    print(markdown)
    print(f"results: {args.out / 'fleet_sim.json'}", file=sys.stderr)
    return 0


def cmd_fleet_sim_calibrate(args: argparse.Namespace) -> int:
    from ember.bench.fleet_sim.calibrate import (
        CalibrationConfig,
        run_calibration,
        write_calibration,
    )

    record = run_calibration(CalibrationConfig(
        model_size=args.model_size, model_dir=args.model, num_threads=args.num_threads,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        repeats=args.repeats))
    write_calibration(record, args.out)
    print(json.dumps({k: record[k] for k in ("step_model", "fit", "held_out", "speeds",
                                             "machine")}, indent=1))
    print(f"calibration: {args.out}", file=sys.stderr)
    return 0


def add_fleet_sim_parser(sub: argparse._SubParsersAction) -> None:
    """Add `fleet-sim` and `fleet-sim-calibrate` to `ember bench`'s sub-commands."""
    _add_run_parser(sub)
    _add_calibrate_parser(sub)


def _add_engine_limits(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-num-seqs", type=int, default=128, help="Per worker, as ember serve.")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="Per-step token budget per worker, as ember serve.")


def _add_run_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fleet-sim", help="A simulated fleet (virtual time, service times "
                       "from a saved calibration) routed by ember's router code: "
                       "round-robin, least-requests, prefix tree and ember's policy with and "
                       "without x-session-affinity on the multi-turn sessions trace.")
    p.add_argument("--calibration", type=Path, default=DEFAULT_CALIBRATION,
                   help="Step-time model from `ember bench fleet-sim-calibrate`.")
    p.add_argument("--workers", type=_ints, default=(16, 64), help="Fleet sizes.")
    p.add_argument("--loads", type=_floats, default=(0.5, 0.8, 1.0),
                   help="Offered load as fractions of the fleet's capacity (see capacity.py).")
    p.add_argument("--policies", type=_csv, default=tuple(POLICY_SPECS),
                   help=f"Comma-separated subset of {','.join(POLICY_SPECS)}.")
    p.add_argument("--sessions-per-worker", type=int, default=40,
                   help="Trace length: sessions per worker in the fleet.")
    p.add_argument("--turns", type=int, default=8, help="Turns per session.")
    p.add_argument("--system-prompt-len", type=int, default=4000,
                   help="Tokens of the system prompt every session shares.")
    p.add_argument("--input-len", type=int, default=256, help="New tokens per turn.")
    p.add_argument("--output-len", type=int, default=128, help="Output tokens per turn.")
    p.add_argument("--range-ratio", type=float, default=0.5,
                   help="Lengths uniform in [len*(1-r), len*(1+r)].")
    p.add_argument("--think-time-s", type=float, default=1.0,
                   help="Mean pause (exponential) between an answer and the next turn.")
    p.add_argument("--kv-tokens", type=int, default=1 << 19, help="KV cache per worker, tokens.")
    _add_engine_limits(p)
    p.add_argument("--decode-weight", type=float, default=0.25,
                   help="ember's cost function: weight of decode tokens in flight.")
    p.add_argument("--capacity-requests", type=int, default=1500,
                   help="Requests in the one-worker saturation run that defines load 1.0.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the trace and the policies.")
    p.add_argument("--out", type=Path, default=Path("bench-results/fleet-sim"),
                   help="Directory for fleet_sim.json and fleet_sim.md.")
    p.set_defaults(func=cmd_fleet_sim)


def _add_calibrate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fleet-sim-calibrate", help="Time ember's real engine step by step "
                       "(prefill, decode and mixed batches) and fit the fleet simulator's "
                       "step-time model; writes JSON.")
    p.add_argument("--model-size", choices=("10m", "250m"), default="10m",
                   help="Bench model shape (built once, with a 16k context).")
    p.add_argument("--model", type=Path, default=None, help="Use this model directory.")
    p.add_argument("--num-threads", type=int, default=1, help="Torch threads of the engine.")
    p.add_argument("--repeats", type=int, default=3,
                   help="Runs of each scenario; each step's fastest time is kept.")
    _add_engine_limits(p)
    p.add_argument("--out", type=Path, default=DEFAULT_CALIBRATION, help="JSON to write.")
    p.set_defaults(func=cmd_fleet_sim_calibrate)
