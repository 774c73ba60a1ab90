"""The `ember` command: serve | generate | bench. The only module that reads argv.

Engine options are generated from the config dataclasses, so `--help` shows each field's help.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import Any

from ember.config import EngineConfig, RouterConfig, ServerConfig, option_fields


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine options")
    group.add_argument("--model", default=None,
                       help="Hugging Face-format model directory (default: the demo model).")
    _add_field_options(group, [(n, f) for n, f in option_fields() if n != "model"])


def _add_field_options(group: argparse._ArgumentGroup,
                       named_fields: list[tuple[str, dataclasses.Field]]) -> None:
    """One flag per config field, its help and default from the field's metadata."""
    for name, f in named_fields:
        flag = "--" + name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        if f.type in ("bool", bool):
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                               default=None, help=help_text)
        else:
            group.add_argument(flag, dest=name, type=_field_parser(f), default=None,
                               choices=f.metadata.get("choices"), help=help_text)


def _field_parser(f: dataclasses.Field):
    text = str(f.type)
    if "int" in text:
        return int
    if "float" in text:
        return float
    return str


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The engine options the user set on the command line (unset ones keep their defaults)."""
    return {name: getattr(args, name) for name, _ in option_fields()
            if name != "model" and getattr(args, name, None) is not None}


def _model_dir(args: argparse.Namespace) -> str:
    if args.model:
        return args.model
    from ember.model.demo import demo_model_dir

    return str(demo_model_dir())


def server_config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServerConfig)
                           if getattr(args, f.name, None) is not None})


def cmd_serve(args: argparse.Namespace) -> int:
    from ember.server.launch import run_server

    model = _model_dir(args)
    options = {"preload_grammar": True, **engine_options(args)}
    config = EngineConfig.from_options(model, **options)
    if config.device.cpu_cores is not None:  # before any thread or the engine core starts
        from ember.cpu_cores import bind_to_cores, parse_cpu_list

        bind_to_cores(parse_cpu_list(config.device.cpu_cores))
    server = server_config(args)
    name = server.served_model_name or (args.model if args.model else "demo")
    return run_server(config, server, name)


def cmd_router(args: argparse.Namespace) -> int:
    from ember.router.fleet_file import apply_fleet_file
    from ember.router.launch import run_router

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(RouterConfig)
              if f.name != "workers" and getattr(args, f.name, None) is not None}
    config = RouterConfig(workers=tuple(args.worker or ()), **values)
    return run_router(apply_fleet_file(config, values))


def cmd_up(args: argparse.Namespace) -> int:
    from ember.launch.up import FleetPlan, run_up

    prefill, decode, colocated = args.prefill, args.decode, args.workers
    if not (prefill or decode or colocated):
        prefill, decode = 1, 1
    extra = [a for a in args.worker_args if a != "--"]
    plan = FleetPlan(_model_dir(args), args.served_model_name or (args.model or "demo"),
                     prefill, decode, colocated, args.host, args.port,
                     args.kv_transfer_backend, tuple(extra), bind_cores=args.bind_cores)
    return run_up(plan)


def cmd_generate(args: argparse.Namespace) -> int:
    from ember import LLM, SamplingParams

    llm = LLM(_model_dir(args), **engine_options(args))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    for out in llm.generate(args.prompt, params):
        print(out.outputs[0].text)
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from ember.compress.compressor import compress_model_dir

    report = compress_model_dir(args.model_dir, args.out_dir, min_numel=args.min_numel,
                                threads=args.threads)
    print(report.summary())
    print(f"verified bit for bit; serve it with: ember serve --model {args.out_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ember", description="ember: open LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="Serve a model over the OpenAI HTTP API.")
    _add_engine_options(serve)
    _add_field_options(serve.add_argument_group("server options"),
                       [(f.name, f) for f in dataclasses.fields(ServerConfig)])
    serve.set_defaults(func=cmd_serve)

    router = sub.add_parser("router", help="Route OpenAI requests over ember serve workers.")
    router.add_argument("--worker", action="append", default=None,
                        help="Worker base URL, e.g. http://127.0.0.1:8001 (repeatable).")
    _add_field_options(router.add_argument_group("router options"),
                       [(f.name, f) for f in dataclasses.fields(RouterConfig)
                        if f.name != "workers"])
    router.set_defaults(func=cmd_router)

    up = sub.add_parser("up", help="Start a fleet on this machine: workers (prefill + decode, "
                        "or colocated) behind a router; Ctrl-C stops them all.")
    up.add_argument("--model", default=None, help="Model directory (default: the demo model).")
    up.add_argument("--prefill", type=int, default=0, help="Prefill workers.")
    up.add_argument("--decode", type=int, default=0, help="Decode workers.")
    up.add_argument("--workers", type=int, default=0, help="Colocated workers (instead).")
    up.add_argument("--host", default="127.0.0.1", help="The router's address.")
    up.add_argument("--port", type=int, default=8000, help="The router's port.")
    up.add_argument("--kv-transfer-backend", default="shm", choices=("shm", "mooncake"),
                    help="How disaggregated workers move KV (default: shm, same host).")
    up.add_argument("--served-model-name", default=None, help="Model id clients send.")
    up.add_argument("--bind-cores", action=argparse.BooleanOptionalAction, default=False,
                    help="Give each worker its own cores (an equal, disjoint share), so workers "
                         "never compete for one; the router is not bound.")
    up.add_argument("worker_args", nargs=argparse.REMAINDER,
                    help="After `--`: engine options for every worker (e.g. -- --dtype "
                         "float32).")
    up.set_defaults(func=cmd_up)

    comp = sub.add_parser("compress", help="Compress a model's BF16 weights losslessly into a "
                          "directory ember serves directly.")
    comp.add_argument("model_dir", help="Hugging Face-format model directory (safetensors).")
    comp.add_argument("out_dir", help="Where to write the compressed model (new or empty).")
    comp.add_argument("--min-numel", type=int, default=1 << 16,
                      help="Compress BF16 matrices of at least this many elements.")
    comp.add_argument("--threads", type=int, default=None, help="Encoder threads (all cores).")
    comp.set_defaults(func=cmd_compress)

    gen = sub.add_parser("generate", help="Generate completions for prompts and exit.")
    _add_engine_options(gen)
    gen.add_argument("--prompt", action="append", required=True, help="A prompt (repeatable).")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.set_defaults(func=cmd_generate)

    try:
        from ember.bench.cli import add_bench_parser
    except ImportError:
        pass
    else:
        add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
