"""`ember bench kv-transfer`: each KV transport's raw GB/s against its GB/s on KV-block patterns,
between two processes, in one run.

Raw: one large contiguous write. Block pattern: a whole prompt's blocks of a Llama-8B-shaped
layer (fewer layers), random block ids on both sides (or consecutive ones), in one write or one
write per layer (as a sender overlapping with compute would), for ember's two pool layouts.
Raw and pattern writes alternate round by round; the blocks' bytes are checked (SHA-256) after.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import multiprocessing.connection
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ember.kv.transfer import BlockLayout, KVTransport, make_transport
from ember.kv.transfer.layout import Segments

# block axis of the pool [layers, ...]: 2 = [L, 2, blocks, bs, heads, dim] (block-major),
# 3 = [L, 2, heads, blocks, bs, dim] (head-major: the torch CPU backend's)
LAYOUTS = {"block-major": 2, "head-major": 3}
PATTERNS = ("random", "consecutive")


@dataclass(frozen=True)
class KVTransferBenchConfig:
    backends: tuple[str, ...] = ("shm", "mooncake")
    layouts: tuple[str, ...] = ("block-major", "head-major")
    patterns: tuple[str, ...] = PATTERNS
    num_layers: int = 8  # Llama-3-8B has 32 of these layers
    num_kv_heads: int = 8
    head_dim: int = 128
    block_size: int = 16
    num_blocks: int = 512  # per pool
    prompt_tokens: int = 4096
    raw_mib: int = 256
    repeats: int = 3
    seed: int = 0
    timeout_s: float = 120.0

    def shape(self, layout: str) -> tuple[int, ...]:
        dims = [self.num_layers, 2, self.num_blocks, self.block_size, self.num_kv_heads,
                self.head_dim]
        if LAYOUTS[layout] == 3:
            dims = [self.num_layers, 2, self.num_kv_heads, self.num_blocks, self.block_size,
                    self.head_dim]
        return tuple(dims)

    @property
    def pool_bytes(self) -> int:
        return (self.num_layers * 2 * self.num_blocks * self.block_size * self.num_kv_heads
                * self.head_dim * 2)  # bf16


def _receiver(conn: Any, backend: str, nbytes: int, timeout_s: float) -> None:
    """The peer: a pool of `nbytes`, registered, described; zeroes or digests it on request."""
    from ember.kv.transfer.shm import shared_kv_pool

    transport = make_transport(backend, timeout_s=timeout_s)
    owner = shared_kv_pool((nbytes,), torch.uint8) if backend == "shm" else None
    pool = owner.tensor if owner is not None else torch.empty(nbytes, dtype=torch.uint8)
    pool.zero_()  # every page touched before timing
    transport.register(pool)
    conn.send(transport.descriptor())
    while (message := conn.recv())[0] != "stop":
        if message[0] == "zero":
            pool.zero_()
            conn.send(None)
        else:  # ("digest", segments): the bytes the segments wrote, in order
            conn.send(_digest(pool.numpy(), message[1][:, 1], message[1][:, 2]))
    transport.close()
    if owner is not None:
        owner.close()


def _digest(data: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> str:
    h = hashlib.sha256()
    for offset, nbytes in zip(offsets.tolist(), lengths.tolist()):
        h.update(data[offset:offset + nbytes].data)
    return h.hexdigest()


class Receiver:
    """A peer process holding a registered pool of `nbytes` (zeroed), for writes to land in."""

    def __init__(self, backend: str, nbytes: int, timeout_s: float) -> None:
        ctx = mp.get_context("forkserver")  # children start clean (no engine) and quickly
        ctx.set_forkserver_preload([__name__])
        self._conn, child = ctx.Pipe()
        self._timeout_s = timeout_s
        self.process = ctx.Process(target=_receiver, args=(child, backend, nbytes, timeout_s),
                                   daemon=True)
        self.process.start()
        self.descriptor = self._reply()

    def ask(self, *message: Any) -> Any:
        self._conn.send(message)
        return self._reply()

    def stop(self) -> None:
        self._conn.send(("stop",))
        self.process.join(self._timeout_s)

    def _reply(self) -> Any:
        ready = mp.connection.wait([self._conn, self.process.sentinel], self._timeout_s)
        if self._conn not in ready:
            self.process.kill()
            raise RuntimeError(f"the receiving process died or hung (exit code "
                               f"{self.process.exitcode})")
        return self._conn.recv()


def _time_round(transport: KVTransport, peer: dict[str, Any], writes: list[Segments]) -> float:
    """Seconds to have `writes` land: one blocking write (as the prefill worker sends a
    prompt), or several queued together."""
    start = time.perf_counter()
    if len(writes) == 1:
        transport.write(peer, writes[0])
        return time.perf_counter() - start
    for future in [transport.write_async(peer, segments) for segments in writes]:
        future.result()
    return time.perf_counter() - start


def _rate(nbytes: int, seconds: list[float]) -> dict[str, Any]:
    rates = [nbytes / s / 1e9 for s in seconds]
    return {"gbps": statistics.median(rates), "gbps_runs": rates, "nbytes": nbytes}


def _block_ids(cfg: KVTransferBenchConfig, pattern: str) -> tuple[np.ndarray, np.ndarray]:
    num = -(-cfg.prompt_tokens // cfg.block_size)
    if pattern == "consecutive":
        return np.arange(num), np.arange(cfg.num_blocks - num, cfg.num_blocks)
    rng = np.random.default_rng(cfg.seed)
    return (rng.choice(cfg.num_blocks, num, replace=False),
            rng.choice(cfg.num_blocks, num, replace=False))


def _bench_pattern(cfg: KVTransferBenchConfig, transport: KVTransport, receiver: Receiver,
                   local: np.ndarray, layout_name: str, pattern: str) -> dict[str, Any]:
    """Raw, whole-prompt and layer-by-layer writes in turn, each round after an untimed one, so
    every ratio compares measurements taken moments apart on a shared machine."""
    layout = BlockLayout.from_shape(cfg.shape(layout_name), 2, LAYOUTS[layout_name])
    src_ids, dst_ids = _block_ids(cfg, pattern)
    whole = layout.segments(src_ids, dst_ids)
    raw_bytes = min(cfg.raw_mib << 20, cfg.pool_bytes)
    modes = {"raw": [np.array([[0, 0, raw_bytes]])], "whole": [whole],
             "per_layer": [layout.segments(src_ids, dst_ids, layers=[i])
                           for i in range(cfg.num_layers)]}
    receiver.ask("zero")
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    for round_idx in range(cfg.repeats + 1):
        for mode, writes in modes.items():
            elapsed = _time_round(transport, receiver.descriptor, writes)
            if round_idx:
                seconds[mode].append(elapsed)
    if receiver.ask("digest", whole) != _digest(local, whole[:, 0], whole[:, 2]):
        raise RuntimeError(f"{transport.name}: {layout_name}/{pattern} blocks arrived corrupted")
    nbytes = int(whole[:, 2].sum())
    row = {"layout": layout_name, "pattern": pattern, "num_blocks": len(src_ids),
           "num_segments": len(whole), "segment_kib": layout.segment_bytes / 1024,
           "raw": _rate(raw_bytes, seconds["raw"]), "whole": _rate(nbytes, seconds["whole"]),
           "per_layer": _rate(nbytes, seconds["per_layer"])}
    for mode in ("whole", "per_layer"):
        row[mode]["of_raw"] = row[mode]["gbps"] / row["raw"]["gbps"]
    return row


def _bench_backend(cfg: KVTransferBenchConfig, backend: str) -> dict[str, Any]:
    receiver = Receiver(backend, cfg.pool_bytes, cfg.timeout_s)
    transport = make_transport(backend, timeout_s=cfg.timeout_s)
    local = torch.randint(0, 256, (cfg.pool_bytes,), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(cfg.seed))
    try:
        transport.register(local)
        rows = [_bench_pattern(cfg, transport, receiver, local.numpy(), layout, pattern)
                for layout in cfg.layouts for pattern in cfg.patterns]
        return {"backend": backend, "patterns": rows}
    finally:
        transport.close()
        receiver.stop()


def run_kv_transfer_bench(cfg: KVTransferBenchConfig) -> dict[str, Any]:
    from ember.bench.throughput import code_version, machine_info

    torch.set_num_threads(1)
    return {"config": asdict(cfg), "pool_bytes": cfg.pool_bytes, "machine": machine_info(),
            "code": code_version(),
            "mooncake": _mooncake_version(),
            "backends": [_bench_backend(cfg, backend) for backend in cfg.backends]}


def _mooncake_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mooncake-transfer-engine-non-cuda")
    except PackageNotFoundError:
        return None


def kv_transfer_markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [f"Pool: {cfg['num_layers']} layers x {cfg['num_kv_heads']} KV heads x "
             f"{cfg['head_dim']} dim, bf16, {cfg['block_size']}-token blocks, "
             f"{cfg['num_blocks']} blocks ({report['pool_bytes'] / 2**20:g} MiB); "
             f"prompt {cfg['prompt_tokens']} tokens; median of {cfg['repeats']} runs.", "",
             "| backend | layout | block ids | segments (KiB each) | raw GB/s | whole prompt "
             "GB/s | of raw | layer by layer GB/s | of raw |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for entry in report["backends"]:
        for row in entry["patterns"]:
            whole, layered = row["whole"], row["per_layer"]
            lines.append(
                f"| {entry['backend']} | {row['layout']} | {row['pattern']} | "
                f"{row['num_segments']:,} ({row['segment_kib']:g}) | {row['raw']['gbps']:.2f} | "
                f"{whole['gbps']:.2f} | {whole['of_raw']:.0%} | {layered['gbps']:.2f} | "
                f"{layered['of_raw']:.0%} |")
    return "\n".join(lines)


_INT_HELP = {"num_layers": "Layers of the pool", "num_kv_heads": "KV heads per layer",
             "head_dim": "Head dimension", "block_size": "Tokens per block",
             "num_blocks": "Blocks per pool (both sides)",
             "prompt_tokens": "Tokens of the prompt whose blocks are sent",
             "raw_mib": "Size of the contiguous raw write, MiB (at most the pool)",
             "repeats": "Timed rounds per measurement, after one untimed",
             "seed": "Seed of the random block ids and pool bytes"}


def add_kv_transfer_parser(sub: Any) -> None:
    kt = sub.add_parser("kv-transfer", help="KV transports' raw GB/s vs their GB/s on KV-block "
                        "patterns (random/consecutive ids, whole prompt / layer by layer), "
                        "between two processes.")
    defaults = KVTransferBenchConfig()
    kt.add_argument("--backends", default=",".join(defaults.backends),
                    help="Comma-separated transports (shm, mooncake).")
    kt.add_argument("--layouts", default=",".join(defaults.layouts),
                    help="Comma-separated pool layouts: block-major, head-major.")
    kt.add_argument("--patterns", default=",".join(defaults.patterns),
                    help="Comma-separated block-id patterns: random, consecutive.")
    for field, text in _INT_HELP.items():
        kt.add_argument(f"--{field.replace('_', '-')}", type=int,
                        default=getattr(defaults, field),
                        help=f"{text} (default {getattr(defaults, field)}).")
    kt.add_argument("--out", type=Path, default=Path("benchmarks/kv-transfer"),
                    help="Directory for the JSON report.")
    kt.set_defaults(func=_cmd_kv_transfer)


def _cmd_kv_transfer(args: Any) -> int:
    cfg = KVTransferBenchConfig(
        backends=_csv(args.backends), layouts=_csv(args.layouts), patterns=_csv(args.patterns),
        num_layers=args.num_layers, num_kv_heads=args.num_kv_heads, head_dim=args.head_dim,
        block_size=args.block_size, num_blocks=args.num_blocks, prompt_tokens=args.prompt_tokens,
        raw_mib=args.raw_mib, repeats=args.repeats, seed=args.seed)
    unknown = [x for x in cfg.layouts if x not in LAYOUTS] + [
        x for x in cfg.patterns if x not in PATTERNS]
    if unknown:
        raise SystemExit(f"unknown layout/pattern {unknown}; known: {list(LAYOUTS)}, "
                         f"{list(PATTERNS)}")
    report = run_kv_transfer_bench(cfg)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kv_transfer.json").write_text(json.dumps(report, indent=2))
    print(kv_transfer_markdown(report))
    return 0


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())
