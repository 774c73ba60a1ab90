"""One Llama-3-8B-shaped layer kept compressed on a GPU: its refill hook with the pieces
decoded one after another vs one stream each, eagerly and replayed from a CUDA graph; every
output checked bit for bit. Run: python3 benchmarks/gpu/resident_streams_probe.py [out.json]
"""

import json
import sys

import numpy as np
import torch

from ember.bench.gpu_timing import cuda_median_ms
from ember.compress.codec import encode_bf16
from ember.compress.resident import Piece, _decoder, _refill
from ember.compress.triton_decode import to_device

# (rows, cols) of each checkpoint tensor, and the fused buffer and rows it fills
SHAPES = {"qkv": [(4096, 4096), (1024, 4096), (1024, 4096)], "o": [(4096, 4096)],
          "gate_up": [(14336, 4096), (14336, 4096)], "down": [(4096, 14336)]}


def build_layer():
    gen = torch.Generator().manual_seed(0)
    entries, expected = [], []
    for shapes in SHAPES.values():
        rows = sum(r for r, _ in shapes)
        buffer = torch.empty(rows, shapes[0][1], dtype=torch.bfloat16, device="cuda")
        parts, start = [], 0
        for r, c in shapes:
            values = (torch.randn(r, c, generator=gen) * 0.02).to(torch.bfloat16)
            bits = values.view(torch.int16).numpy().view(np.uint16).ravel()
            parts.append(Piece(to_device(encode_bf16(bits), "cuda"),
                               (slice(start, start + r),)))
            start += r
            expected.append(values)
        entries.append((buffer, parts))
    return entries, torch.cat([v.flatten() for v in expected])


def main():
    entries, expected = build_layer()
    decode = _decoder(torch.device("cuda"))
    num = sum(len(p) for _, p in entries)
    hooks = {"sequential": _refill(entries, decode),
             "streams": _refill(entries, decode, [torch.cuda.Stream() for _ in range(num)])}
    result = {}
    for name, hook in hooks.items():
        for buffer, _ in entries:
            buffer.fill_(float("nan"))
        hook(None, ())
        torch.cuda.synchronize()
        got = torch.cat([b.flatten().cpu() for b, _ in entries])
        assert torch.equal(got.view(torch.int16), expected.view(torch.int16)), name
        result[name] = cuda_median_ms(lambda h=hook: h(None, ()))
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        hooks["streams"](None, ())  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        hooks["streams"](None, ())
    for buffer, _ in entries:
        buffer.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    got = torch.cat([b.flatten().cpu() for b, _ in entries])
    assert torch.equal(got.view(torch.int16), expected.view(torch.int16)), "graph"
    result["streams_graph"] = cuda_median_ms(graph.replay)
    mib = expected.numel() * 2 / 2**20
    for name, ms in result.items():
        print(f"{name}: {ms:.3f} ms for the layer's {mib:.0f} MiB "
              f"({expected.numel() * 2 / ms / 1e6:.0f} GB/s)", flush=True)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
