"""The Triton rANS decoder alone on an H100/H200: GB/s at several groups per program (the
kernel's one tuning knob), on Llama-3-8B's MLP shape.

Run: python3 benchmarks/gpu/triton_decode_probe.py [out.json]
"""

import json
import sys

from ember.bench.compress.resident import triton_decode_speed
from ember.compress import triton_decode as td

rows = {}
for groups in (1, 2, 4, 8, 16):
    td.GROUPS_PER_PROGRAM = groups
    rows[groups] = triton_decode_speed()
    print(f"groups/program {groups}: {rows[groups]['seconds'] * 1e3:.3f} ms, "
          f"{rows[groups]['output_gb_s']:.1f} GB/s decoded", flush=True)
if len(sys.argv) > 1:
    with open(sys.argv[1], "w") as f:
        json.dump(rows, f, indent=1)
