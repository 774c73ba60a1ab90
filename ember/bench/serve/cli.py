"""`ember bench serve` arguments: parses them into a ServeBenchConfig and runs it.

ember/bench/cli.py adds this sub-command (and reuses the load options for `serve-compare`);
nothing else here reads argv.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ember.bench.serve.config import DATASETS, ENDPOINTS, ServeBenchConfig


def load_config(args: argparse.Namespace, url: str, model: str | None) -> ServeBenchConfig:
    """The load options added by `add_load_args`, against `model` at the server at `url`."""
    return ServeBenchConfig(
        url=url, num_prompts=args.num_prompts, rate=args.rate, dataset=args.dataset,
        model=model, endpoint=args.endpoint, max_concurrency=args.max_concurrency,
        seed=args.seed, input_len=args.input_len, output_len=args.output_len,
        range_ratio=args.range_ratio, ignore_eos=args.ignore_eos, tokenizer=args.tokenizer,
        api_key=args.api_key, slo_ttft_ms=args.slo_ttft_ms, slo_itl_ms=args.slo_itl_ms,
        slo_e2e_ms=args.slo_e2e_ms, sessions=args.sessions, turns=args.turns,
        system_prompt_len=args.system_prompt_len, request_timeout_s=args.request_timeout_s,
    )


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from ember.bench.serve.run import run_serve_bench

    cfg = replace(load_config(args, args.url, args.model), output=args.output, plot=args.plot)
    summary = run_serve_bench(cfg)
    return 0 if summary["num_completed"] > 0 else 1


def add_serve_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="Load an OpenAI-compatible server with streamed requests "
                       "at a Poisson rate; report TTFT, ITL, TPOT, E2E, throughput, goodput.")
    p.add_argument("--url", required=True, help="Server root, e.g. http://127.0.0.1:8000.")
    p.add_argument("--model", default=None,
                   help="Model name to request (default: the first id of GET /v1/models).")
    add_load_args(p)
    p.add_argument("--output", type=Path, default=None, help="Write the JSON report here.")
    p.add_argument("--plot", type=Path, default=None, help="Write a PNG of the run here.")
    p.set_defaults(func=cmd_bench_serve)
    return p


def add_load_args(p: argparse.ArgumentParser) -> None:
    """The trace and load options (everything but the server, the model name and outputs)."""
    p.add_argument("--endpoint", choices=tuple(ENDPOINTS), default="chat",
                   help="chat: /v1/chat/completions; completions: /v1/completions.")
    p.add_argument("--dataset", choices=DATASETS, default="random",
                   help="random prompts, or multi-turn agent sessions sharing a system prompt.")
    p.add_argument("--num-prompts", type=int, default=100,
                   help="Requests to send (sessions: caps sessions x turns).")
    p.add_argument("--rate", type=float, default=float("inf"),
                   help="Arrivals per second, Poisson (sessions: session starts); inf: all "
                   "at once.")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="Most requests in flight at once (default: no cap).")
    p.add_argument("--seed", type=int, default=0, help="Seed of prompts and arrivals.")
    p.add_argument("--input-len", type=int, default=1024,
                   help="Prompt tokens (random) or tokens each turn adds (sessions).")
    p.add_argument("--output-len", type=int, default=128, help="max_tokens of each request.")
    p.add_argument("--range-ratio", type=float, default=0.0,
                   help="Lengths uniform in [len*(1-r), len*(1+r)].")
    p.add_argument("--ignore-eos", action="store_true",
                   help='Send vLLM\'s "ignore_eos": true so each output is exactly max_tokens.')
    p.add_argument("--tokenizer", default=None,
                   help="Hugging Face tokenizer directory: prompts of exact token lengths "
                   "(default: words; lengths then come from the server's usage).")
    p.add_argument("--api-key", default=None, help="Sent as 'Authorization: Bearer KEY'.")
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="Goodput: TTFT limit.")
    p.add_argument("--slo-itl-ms", type=float, default=None,
                   help="Goodput: limit on each request's mean inter-token latency (TPOT).")
    p.add_argument("--slo-e2e-ms", type=float, default=None, help="Goodput: E2E limit.")
    p.add_argument("--sessions", type=int, default=None,
                   help="Sessions dataset: sessions (default: num-prompts / turns).")
    p.add_argument("--turns", type=int, default=8, help="Sessions dataset: turns per session.")
    p.add_argument("--system-prompt-len", type=int, default=4000,
                   help="Sessions dataset: tokens of the system prompt all sessions share.")
    p.add_argument("--request-timeout-s", type=float, default=3600.0,
                   help="Give up on a request after this long.")
