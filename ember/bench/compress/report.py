"""Markdown tables of a compression bench report (run.py's JSON), ready for BENCHMARKS.md."""

from __future__ import annotations

from ember.bench.compress.sizes import CODECS

TARGET_REDUCTION = 0.30  # at least this much smaller on trained BF16 linear weights
TARGET_BOUND_RATIO = 1.01  # within 1% of the exponent-entropy bound
TARGET_DECODE_GBPS = 1.0  # CPU decompression per core


def to_markdown(report: dict) -> str:
    env = report["environment"]
    parts = [f"CPU: {env['cpu']} ({env['num_cores']} cores); zipnn {env.get('zipnn')}, "
             f"dfloat11 {env.get('dfloat11')}.", "", sizes_table(report), "",
             speed_table(report)]
    if report.get("load"):
        parts += ["", load_table(report)]
    parts += ["", *notes(report)]
    return "\n".join(parts) + "\n"


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.2f}"


def sizes_table(report: dict) -> str:
    lines = ["Sizes of the BF16 linear weights (2-D: linear layers and embeddings); per codec "
             "MB, % smaller than BF16, × the per-tensor exponent-entropy bound.", "",
             "| model | tensors | BF16 MB | bound MB (% smaller) | " +
             " | ".join(CODECS) + " |", "|---|---:|---:|---:|" + "---:|" * len(CODECS)]
    for model in report["models"]:
        t = model["totals"]
        cells = []
        for codec in CODECS:
            c = t["codecs"].get(codec)
            cells.append("n/a" if c is None else
                         f"{_mb(c['bytes'])} ({c['reduction']:.1%}, {c['ratio_to_bound']:.4f}×)"
                         + ("" if c["is_exact"] else " NOT EXACT"))
        lines.append(f"| {model['name']} | {t['num_tensors']} | {_mb(t['original_bytes'])} | "
                     f"{_mb(t['bound_bytes'])} ({t['bound_reduction']:.1%}) | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def speed_table(report: dict) -> str:
    lines = ["Codec speed, GB/s of BF16 bytes (best of the passes over each model's linear "
             "weights); DFloat11 has no CPU decoder.", "",
             "| model | codec | threads | compress GB/s | decompress GB/s |",
             "|---|---|---:|---:|---:|"]
    for model in report["models"]:
        for key, s in model["speed"].items():
            codec = key.split("_", 1)[0]
            lines.append(f"| {model['name']} | {codec} | {s['threads']} | "
                         f"{s['compress_gbps']:.3f} | {s['decompress_gbps']:.3f} |")
    return "\n".join(lines)


def load_table(report: dict) -> str:
    lines = ["Load from a cold page cache, seconds (best of the cold runs): uncompressed BF16 "
             "→ `ember compress` output (× = compressed time / uncompressed time); the last "
             "column has the page cache warm, so it shows the decoding cost alone.", "",
             "| model | MB BF16 → ember | disk read GB/s | read files | read+decode tensors | "
             "load_model | tensors, warm cache |", "|---|---:|---:|---:|---:|---:|---:|"]
    for load in report["load"]:
        ops, size = load["ops"], load["bytes"]
        disk = size["bf16"] / ops["read"]["bf16"]["best_cold_s"] / 1e9
        cells = [_pair(ops[op]) if op in ops else "n/a" for op in ("read", "tensors", "load_model")]
        warm = ops["tensors"]
        cells.append(f"{warm['bf16']['warm_s']:.3f} → {warm['ember']['warm_s']:.3f}")
        lines.append(f"| {load['name']} | {_mb(size['bf16'])} → {_mb(size['ember'])} | "
                     f"{disk:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pair(op: dict) -> str:
    return (f"{op['bf16']['best_cold_s']:.3f} → {op['ember']['best_cold_s']:.3f} "
            f"({op['ratio']:.2f}×)")


def notes(report: dict) -> list[str]:
    out = []
    for model in report["models"]:
        t, speed = model["totals"], model["speed"]
        ember = t["codecs"]["ember"]
        decode = speed["ember_1_thread"]["decompress_gbps"]
        out.append(f"- {model['name']}: ember {ember['reduction']:.1%} smaller (target ≥ "
                   f"{TARGET_REDUCTION:.0%}: {_met(ember['reduction'] >= TARGET_REDUCTION)}), "
                   f"{ember['ratio_to_bound']:.4f}× the bound (target ≤ {TARGET_BOUND_RATIO}: "
                   f"{_met(ember['ratio_to_bound'] <= TARGET_BOUND_RATIO)}), decode "
                   f"{decode:.2f} GB/s per core (target ≥ {TARGET_DECODE_GBPS}: "
                   f"{_met(decode >= TARGET_DECODE_GBPS)}).")
        sampled = t["codecs"].get("dfloat11", {}).get("num_sampled_tensors")
        if sampled:
            out.append(f"- {model['name']}: DFloat11's size of {sampled} tensor(s) is "
                       f"estimated from evenly spaced rows (at most "
                       f"{report['dfloat11_max_numel']:,} elements each).")
        below = [r for r in model["tensors"] if r["sizes"].get("zipnn", 1e30) < r["bound_bytes"]]
        if below:
            out.append(f"- {model['name']}: zipnn is below the per-tensor bound on {len(below)} "
                       "tensor(s): it codes 256 KiB chunks with a Huffman table each, so it "
                       "follows local statistics that one distribution per tensor cannot.")
    for name, reason in report.get("skipped_competitors", {}).items():
        out.append(f"- {name} skipped: {reason}")
    for load in report.get("load", []):
        drop = load["cache_drop"]
        if not drop["is_verified"]:
            out.append(f"- {load['name']}: dropping the page cache did not take (cold read "
                       f"{drop['cold_read_s']:.4f} s vs warm {drop['warm_read_s']:.4f} s): "
                       "its 'cold' times are warm.")
    out.append("- DFloat11: one Huffman codec per tensor (its release shares one per "
               "transformer block), sizes as its own summary counts them (without its decode "
               "tables); it decodes on CUDA only, so it has no CPU speed here.")
    return out


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"
