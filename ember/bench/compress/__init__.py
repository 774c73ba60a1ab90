"""`ember bench compress`: ember's BF16 weight codec against the exponent-entropy bound, zipnn and
DFloat11 on the same tensors, codec speed per core, and cold-cache load times (BENCHMARKS.md)."""
