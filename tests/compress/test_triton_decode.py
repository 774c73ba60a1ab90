"""The Triton rANS decoder against the bits that were encoded (and the C/numpy decoders).

Without a GPU the kernel runs in triton's interpreter (conftest.py sets TRITON_INTERPRET=1),
about 4 ms per step, so each program with a full group costs ~8 s: full groups stay few.
With a GPU the same tests launch on CUDA, plus the `gpu`-marked ones.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from ember.compress.codec import (
    GROUP_LANES,
    GROUP_SYMBOLS,
    CorruptStreamError,
    EncodedBF16,
    decode_bf16,
    encode_bf16,
)
from ember.compress.reference import decode_reference
from tests.triton_device import needs_compiled_gpu, triton_device

pytest.importorskip("triton")

from ember.compress import triton_decode as td  # noqa: E402  (after the triton check)

DEVICE = triton_device(td.IS_INTERPRETED)
needs_gpu = needs_compiled_gpu(td.IS_INTERPRETED)


def _weight_bits(numel: int, seed: int = 0) -> np.ndarray:
    """BF16 bits (uint16) of weight-like values: normal, small, a few exponents dominate."""
    gen = torch.Generator().manual_seed(seed)
    values = (torch.randn(numel, generator=gen) * 0.02).to(torch.bfloat16)
    return values.view(torch.int16).numpy().view(np.uint16)


def _decode(enc: EncodedBF16, check: bool = True) -> np.ndarray:
    out = torch.empty(enc.numel, dtype=torch.bfloat16, device=DEVICE)
    td.decode_bf16_triton(td.to_device(enc, DEVICE), out, check=check)
    return out.view(torch.int16).cpu().numpy().view(np.uint16)


def _with(enc: EncodedBF16, **arrays: np.ndarray) -> EncodedBF16:
    return dataclasses.replace(enc, **{k: v.copy() for k, v in arrays.items()})


# 4 * GROUP_SYMBOLS + 100: five groups, so a second program whose last group is 4 steps long
# (a full group beside a one-element one: test_every_bit_pattern)
@pytest.mark.parametrize("numel", [0, 1, 31, 33, 64, 4 * GROUP_SYMBOLS + 100])
def test_decodes_the_encoded_bits(numel: int) -> None:
    bits = _weight_bits(numel, seed=numel)
    np.testing.assert_array_equal(_decode(encode_bf16(bits)), bits)


def test_every_bit_pattern() -> None:
    """Every exponent, NaNs, infinities, subnormals and -0, shuffled over one full group; then a
    second group of one element, whose lanes sit idle for all but one step of the program."""
    bits = np.append(np.random.default_rng(0).permutation(1 << 16), 0x3F80).astype(np.uint16)
    np.testing.assert_array_equal(_decode(encode_bf16(bits)), bits)


def test_single_exponent() -> None:
    rng = np.random.default_rng(1)
    bits = ((rng.integers(0, 2, 3000) << 15) | (127 << 7) | rng.integers(0, 128, 3000))
    bits = bits.astype(np.uint16)
    enc = encode_bf16(bits)
    assert np.count_nonzero(enc.freq) == 2  # the lone symbol and a 1-slot neighbour
    np.testing.assert_array_equal(_decode(enc), bits)


def test_slot_table_matches_the_distribution() -> None:
    freq = encode_bf16(_weight_bits(5000)).freq.astype(np.int64)
    table = td.slot_table(freq)
    cum = np.concatenate([[0], np.cumsum(freq)[:-1]])
    symbol = table >> 24
    np.testing.assert_array_equal(symbol, np.repeat(np.arange(256), freq))
    np.testing.assert_array_equal(table & 0xFFF, freq[symbol])
    np.testing.assert_array_equal((table >> 12) & 0xFFF, np.arange(4096) - cum[symbol])


def test_writes_into_a_view_of_the_weight_only() -> None:
    bits = _weight_bits(40 * 70, seed=3)
    buffer = torch.zeros(bits.size + 16, dtype=torch.bfloat16, device=DEVICE)
    weight = buffer[8:8 + bits.size].view(40, 70)
    returned = td.decode_bf16_triton(td.to_device(encode_bf16(bits), DEVICE), weight)
    assert returned is weight
    got = buffer.view(torch.int16).cpu().numpy().view(np.uint16)
    np.testing.assert_array_equal(got[8:-8], bits)
    assert not got[:8].any() and not got[-8:].any()


@pytest.mark.parametrize("shape, dtype, columns", [
    ((100,), torch.float16, None), ((99,), torch.bfloat16, None), ((20, 10), torch.bfloat16, 5),
], ids=["dtype", "size", "strided"])
def test_rejects_a_wrong_out(shape: tuple[int, ...], dtype: torch.dtype,
                             columns: int | None) -> None:
    enc = td.to_device(encode_bf16(_weight_bits(100)), DEVICE)
    out = torch.empty(shape, dtype=dtype, device=DEVICE)[..., :columns]
    with pytest.raises(ValueError, match="out must be 100 contiguous bfloat16"):
        td.decode_bf16_triton(enc, out)


def test_rejects_pieces_that_do_not_fit() -> None:
    enc = encode_bf16(_weight_bits(100))
    with pytest.raises(CorruptStreamError):
        td.to_device(_with(enc, words=enc.words[:-1]), DEVICE)


def test_corrupt_word_raises_naming_its_group() -> None:
    enc = encode_bf16(_weight_bits(3000, seed=4))
    words = enc.words.copy()
    words[int(enc.offsets[1]) // 2] ^= 0x0101
    bad = _with(enc, words=words)
    with pytest.raises(CorruptStreamError):
        decode_reference(bad)
    with pytest.raises(CorruptStreamError, match="group 0 "):
        _decode(bad)
    assert _decode(bad, check=False).size == enc.numel  # no check: wrong values, no error


def test_group_ending_off_its_offset_raises() -> None:
    """Every state ends right, but the group's stream has a word its lanes never read."""
    enc = encode_bf16(_weight_bits(3000, seed=7))
    offsets = enc.offsets.copy()
    offsets[1] += 1
    bad = _with(enc, offsets=offsets, words=np.insert(enc.words, int(enc.offsets[1]), 0))
    with pytest.raises(CorruptStreamError):
        decode_reference(bad)
    with pytest.raises(CorruptStreamError, match="group 0 "):
        _decode(bad)


def test_corrupt_states_never_read_past_the_words() -> None:
    """Zero states renormalise every lane at every step, running the read position far past the
    stream: the reads stay in the stream (its last word), whatever follows it in memory."""
    enc = encode_bf16(_weight_bits(3000, seed=8))
    dev = td.to_device(_with(enc, states=np.zeros_like(enc.states)), DEVICE)
    decoded = []
    for guard in (0, -1):  # int16 fill of the memory after the words
        buffer = torch.full((dev.words.numel() + 4096,), guard, dtype=torch.int16, device=DEVICE)
        buffer[:dev.words.numel()] = dev.words
        out = torch.empty(enc.numel, dtype=torch.bfloat16, device=DEVICE)
        td.decode_bf16_triton(dataclasses.replace(dev, words=buffer[:dev.words.numel()]), out,
                              check=False)
        decoded.append(out.view(torch.int16).cpu())
    torch.testing.assert_close(decoded[0], decoded[1], rtol=0, atol=0)


def test_corrupt_state_in_a_later_group_raises_naming_it() -> None:
    enc = encode_bf16(_weight_bits(GROUP_SYMBOLS + 2000, seed=5))
    states = enc.states.copy()
    states[GROUP_LANES + 7] ^= 0x1234
    bad = _with(enc, states=states)
    with pytest.raises(CorruptStreamError):
        decode_reference(bad)
    with pytest.raises(CorruptStreamError, match="group 1 "):
        _decode(bad)


@needs_gpu
@pytest.mark.gpu
def test_large_weight_matches_the_cpu_decoder_without_syncing() -> None:
    bits = _weight_bits(4096 * 4096 + 12345, seed=6)
    enc = encode_bf16(bits)
    dev = td.to_device(enc, DEVICE)
    out = torch.empty(enc.numel, dtype=torch.bfloat16, device=DEVICE)
    td.decode_bf16_triton(dev, out, check=False)  # compiles the kernel
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        td.decode_bf16_triton(dev, out, check=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    np.testing.assert_array_equal(out.view(torch.int16).cpu().numpy().view(np.uint16),
                                  decode_bf16(enc))
    td.decode_bf16_triton(dev, out, check=True)  # a correct stream passes the check
