"""Lossless BF16 weight compression: the exponent byte entropy-coded with lane-interleaved rANS,
sign and mantissa stored raw (format: docs/compression.md)."""
