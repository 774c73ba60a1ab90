"""The rANS exponent codec: bit-exact round trips on adversarial tensors, the C decoder against
the numpy reference, and corrupt streams caught."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from ember.compress.codec import (
    GROUP_SYMBOLS,
    PROB_SCALE,
    CorruptStreamError,
    decode_bf16,
    encode_bf16,
    entropy_bits,
    exponent_histogram,
    normalize_freqs,
)
from ember.compress.native import load_rans
from ember.compress.reference import decode_reference


def bf16_bits(values: torch.Tensor) -> np.ndarray:
    return values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).ravel().copy()


def weights(numel: int, seed: int = 0, scale: float = 0.02) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    return bf16_bits(torch.randn(numel, generator=gen) * scale)


def every_bit_pattern() -> np.ndarray:
    """All 65536 BF16 values: every exponent, NaNs, infinities, subnormals, -0."""
    return np.random.default_rng(0).permutation(np.arange(1 << 16, dtype=np.uint16))


def single_exponent(numel: int) -> np.ndarray:
    rng = np.random.default_rng(1)
    exponent = np.uint16(127 << 7)  # values in [1, 2) and (-2, -1]
    return (rng.integers(0, 1 << 16, numel, dtype=np.uint16) & 0x807F) | exponent


CASES = {
    "empty": np.empty(0, np.uint16),
    "one": weights(1),
    "odd": weights(31),
    "past_a_step": weights(33),
    "one_group": weights(GROUP_SYMBOLS),
    "one_past_a_group": weights(GROUP_SYMBOLS + 1),
    "several_groups_odd": weights(3 * GROUP_SYMBOLS + 12345),
    "every_bit_pattern": every_bit_pattern(),
    "single_exponent": single_exponent(70_001),
    "zeros": np.zeros(1000, np.uint16),
    "negative_zeros": np.full(777, 0x8000, np.uint16),
    "nan_and_inf": np.array([0x7FC0, 0xFFC0, 0x7F80, 0xFF80, 0x7F81, 0x0001, 0x807F] * 50,
                            np.uint16),
}


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_is_bit_exact(name):
    bits = CASES[name]
    enc = encode_bf16(bits)
    assert np.array_equal(decode_bf16(enc), bits)
    assert np.array_equal(decode_reference(enc), bits)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threads_split_large_tensors_the_same(threads):
    bits = weights(5 * GROUP_SYMBOLS + 999, seed=3)
    enc = encode_bf16(bits, threads=threads)
    out = np.full(bits.size, 0xABCD, np.uint16)
    decode_bf16(enc, out=out, threads=threads)
    assert np.array_equal(out, bits)
    assert np.array_equal(enc.words, encode_bf16(bits, threads=1).words)


def test_a_huge_tensor_round_trips_across_a_thousand_groups():
    bits = weights(1000 * GROUP_SYMBOLS + 777, seed=11, scale=3.0)
    enc = encode_bf16(bits)
    assert enc.offsets.size == 1001 + 1 and enc.states.size == 1001 * 32
    assert np.array_equal(decode_bf16(enc), bits)


def test_decodes_into_a_strided_parent_view_in_place():
    """The loader decodes straight into a row slice of a fused parameter."""
    fused = torch.zeros(6, 1000, dtype=torch.bfloat16)
    part = torch.randn(2, 1000, dtype=torch.bfloat16)
    enc = encode_bf16(bf16_bits(part))
    dest = fused[2:4]
    decode_bf16(enc, out=dest.view(torch.int16).numpy().view(np.uint16).reshape(-1))
    assert torch.equal(fused[2:4].view(torch.int16), part.view(torch.int16))
    assert not fused[:2].any() and not fused[4:].any()


def test_size_is_within_a_percent_of_the_entropy_bound():
    bits = weights(4 * GROUP_SYMBOLS, seed=5)
    bound = bits.size + entropy_bits(exponent_histogram(bits)) / 8
    assert encode_bf16(bits).nbytes <= 1.01 * bound
    assert encode_bf16(bits).nbytes < 0.7 * bits.nbytes


def test_frequencies_sum_to_the_scale_and_keep_every_symbol():
    counts = np.zeros(256, np.int64)
    counts[[3, 120, 121, 122, 200]] = [1, 10**9, 10**8, 10**7, 2]
    freq = normalize_freqs(counts)
    assert int(freq.sum()) == PROB_SCALE
    assert np.array_equal(freq > 0, counts > 0)
    lone = np.zeros(256, np.int64)
    lone[255] = 5
    freq = normalize_freqs(lone)
    assert int(freq.sum()) == PROB_SCALE and freq[255] == PROB_SCALE - 1


def test_histogram_matches_numpy():
    bits = every_bit_pattern()
    assert np.array_equal(exponent_histogram(bits), np.bincount((bits >> 7) & 0xFF,
                                                                minlength=256))


def corrupted(enc, **changes):
    return dataclasses.replace(enc, **changes)


@pytest.mark.parametrize("decoder", ["c", "reference"])
def test_a_flipped_word_or_state_is_caught(decoder):
    decode = decode_bf16 if decoder == "c" else decode_reference
    enc = encode_bf16(weights(2 * GROUP_SYMBOLS, seed=7))
    words = enc.words.copy()
    words[len(words) // 2] ^= 0x0400
    with pytest.raises(CorruptStreamError):
        decode(corrupted(enc, words=words))
    states = enc.states.copy()
    states[40] ^= 0x10
    with pytest.raises(CorruptStreamError):
        decode(corrupted(enc, states=states))


def test_inconsistent_pieces_are_refused_before_decoding():
    enc = encode_bf16(weights(4 * GROUP_SYMBOLS + 5))
    offsets = enc.offsets.copy()
    offsets[2], offsets[3] = offsets[3] + 1, offsets[2]
    with pytest.raises(CorruptStreamError, match="offsets"):
        decode_bf16(corrupted(enc, offsets=offsets))
    with pytest.raises(CorruptStreamError, match="end of the word stream"):
        decode_bf16(corrupted(enc, words=enc.words[:-1]))
    with pytest.raises(CorruptStreamError, match="sign_mantissa"):
        decode_bf16(corrupted(enc, sign_mantissa=enc.sign_mantissa[:-1]))
    freq = enc.freq.copy()
    freq[np.argmax(freq)] += 1
    with pytest.raises(CorruptStreamError, match="sum"):
        decode_bf16(corrupted(enc, freq=freq))


def test_the_c_decoder_is_built_here():
    """CI has a compiler: the fast path must be what these tests exercise."""
    assert load_rans() is not None


@pytest.mark.parametrize("name, flags", [("rans-portable", ["-O2"]),
                                         ("rans-avx2", ["-O3", "-mavx2", "-mfma"])])
def test_the_scalar_and_avx2_decoders_match(name, flags):
    """Built without -march=native, rans.c takes its scalar path or, with AVX2 only, its
    8-lane vector path (the AVX-512 one is what the other tests run here)."""
    from ember.compress.native import _SIGNATURES, _SOURCE
    from ember.native import cpu_signature, load_c_library

    if "avx2" in flags[-1] and " avx2 " not in f" {cpu_signature()} ":
        pytest.skip("this CPU has no AVX2")
    lib = load_c_library(name, _SOURCE.read_bytes(), [*flags, "-fPIC"], ["-shared"])
    assert lib is not None
    decode = lib.ember_rans_decode
    decode.restype, decode.argtypes = _SIGNATURES["ember_rans_decode"]

    def run(enc, words, out) -> int:
        return decode(words.ctypes.data, enc.offsets.ctypes.data, enc.states.ctypes.data,
                      enc.freq.ctypes.data, enc.sign_mantissa.ctypes.data, enc.numel, 0,
                      enc.offsets.size - 1, out.ctypes.data)

    for bits in (CASES["several_groups_odd"], CASES["every_bit_pattern"], CASES["odd"]):
        enc = encode_bf16(bits)
        out = np.zeros(bits.size, np.uint16)
        assert run(enc, enc.words, out) == 0 and np.array_equal(out, bits)
    # a corrupt word is caught (skewed data only: uniform exponents leave no redundancy to
    # check, which is what the per-tensor checksum in format.py is for)
    enc = encode_bf16(CASES["several_groups_odd"])
    words = enc.words.copy()
    words[len(words) // 3] ^= 0x0100
    assert run(enc, words, np.zeros(enc.numel, np.uint16)) < 0
