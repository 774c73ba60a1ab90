"""`ember compress`: the output directory serves the same outputs, verifies bit for bit, and a
corrupt or truncated file fails naming itself."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ember import LLM, SamplingParams
from ember.cli import main
from ember.compress.compressor import compress_model_dir, compress_tensor, verify_file
from ember.compress.format import WeightsFile, file_metadata
from ember.model.loader import load_model
from tests.factories import tiny_model_dir

PROMPTS = ["The quick brown fox", {"prompt_token_ids": [5, 17, 300, 2, 9, 44]}]


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("src"), dtype="bfloat16",
                          shard_size="60KB")


@pytest.fixture(scope="module")
def compressed(bf16_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out") / "compressed"
    report = compress_model_dir(bf16_model, out, min_numel=1024, progress=False)
    assert 0 < report.stored_bytes < report.original_bytes
    return out


def generate(model_dir: Path, params: SamplingParams) -> list:
    llm = LLM(str(model_dir), kv_cache_memory=8 << 20)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs)
            for o in llm.generate(PROMPTS, params)]


def test_engine_outputs_are_identical_from_the_compressed_directory(bf16_model, compressed):
    for params in (SamplingParams(max_tokens=16, temperature=0.0, logprobs=3),
                   SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=7, n=2,
                                  logprobs=2)):
        assert generate(compressed, params) == generate(bf16_model, params)


def test_loaded_parameters_are_bit_identical(bf16_model, compressed):
    want, _ = load_model(bf16_model)
    got, info = load_model(compressed)
    assert info.dtype == torch.bfloat16
    for (name, a), (_, b) in zip(want.named_parameters(), got.named_parameters(), strict=True):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16)), name


def test_every_file_but_the_weights_is_copied(bf16_model, compressed):
    for path in bf16_model.iterdir():
        copy = compressed / path.name
        assert copy.is_file(), path.name
        if path.suffix != ".safetensors":
            assert copy.read_bytes() == path.read_bytes()
    with WeightsFile(next(compressed.glob("*.safetensors"))) as f:
        assert f.entries  # the matrices are really stored compressed


def test_cli_compresses_and_refuses_a_non_empty_destination(bf16_model, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["compress", str(bf16_model), str(out), "--min-numel", "1024"]) == 0
    assert "smaller" in capsys.readouterr().out
    assert main(["compress", str(bf16_model), str(out)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_refuses_an_already_compressed_directory(compressed, tmp_path):
    with pytest.raises(ValueError, match="already compressed"):
        compress_model_dir(compressed, tmp_path / "again", progress=False)
    assert not (tmp_path / "again").exists()


def test_fp32_weights_are_compressed_too(tmp_path):
    src = tiny_model_dir(tmp_path / "src")
    report = compress_model_dir(src, tmp_path / "out", min_numel=1024, progress=False)
    assert report.stored_bytes < 0.95 * report.original_bytes
    want, _ = load_model(src)
    got, info = load_model(tmp_path / "out")
    assert info.dtype == torch.float32
    for (name, a), (_, b) in zip(want.named_parameters(), got.named_parameters(), strict=True):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)), name
    params = SamplingParams(max_tokens=6, temperature=0.0, logprobs=2)
    assert generate(tmp_path / "out", params) == generate(src, params)


def test_every_f32_bit_pattern_class_round_trips(tmp_path):
    """An F32 matrix with NaN payloads, infinities, subnormals and -0 among random values,
    read back through the file format bit for bit."""
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 1 << 32, size=(300, 301), dtype=np.uint32)
    # trained-like exponents (a few binades) so compressing pays; random sign and mantissa
    bits = (bits & 0x807FFFFF) | (rng.integers(118, 126, bits.shape, dtype=np.uint32) << 23)
    bits[0, :6] = [0x7FC00001, 0xFF800000, 0x7F800000, 0x00000001, 0x80000000, 0x807FFFFF]
    tensor = torch.from_numpy(bits.view(np.float32))
    _, pieces, entry = compress_tensor("w", tensor, min_numel=1)
    assert entry is not None and entry.dtype == "F32"
    path = tmp_path / "w.safetensors"
    save_file(pieces, str(path), metadata=file_metadata({"w": entry}))
    with WeightsFile(path) as f:
        got = f.get_tensor("w")
    assert got.dtype == torch.float32 and torch.equal(got.view(torch.int32),
                                                      tensor.view(torch.int32))


def _data_range(path: Path, tensor: str) -> tuple[int, int]:
    """Byte range of `tensor` in a safetensors file (8-byte header length, JSON, data)."""
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    begin, end = json.loads(raw[8:8 + header_len])[tensor]["data_offsets"]
    return 8 + header_len + begin, 8 + header_len + end


def _copy(compressed: Path, tmp_path: Path) -> tuple[Path, Path, str]:
    out = tmp_path / "copy"
    out.mkdir()
    for path in compressed.iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    for file in sorted(out.glob("*.safetensors")):
        with WeightsFile(file) as f:
            if f.entries:
                return out, file, next(iter(f.entries))
    raise AssertionError("no compressed tensor")


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("part, where", [("payload", "start"),  # the exponent words
                                         ("payload", "end"),  # the sign/mantissa bytes
                                         ("states", "middle"), ("offsets", "middle")])
def test_a_corrupt_file_fails_naming_file_and_tensor(compressed, tmp_path, part, where):
    out, file, tensor = _copy(compressed, tmp_path)
    begin, end = _data_range(file, f"{tensor}::{part}")
    _flip(file, {"start": begin + 3, "end": end - 3, "middle": (begin + end) // 2}[where])
    with pytest.raises(ValueError) as err:
        load_model(out)
    assert file.name in str(err.value) and tensor in str(err.value)


def test_a_truncated_file_fails_naming_it(compressed, tmp_path):
    out, file, _ = _copy(compressed, tmp_path)
    file.write_bytes(file.read_bytes()[: file.stat().st_size * 2 // 3])
    with pytest.raises(ValueError, match=file.name):
        load_model(out)


def test_verification_compares_every_tensor(bf16_model, compressed):
    original = sorted(bf16_model.glob("*.safetensors"))
    copies = sorted(compressed.glob("*.safetensors"))
    verify_file(original[0], copies[0])
    with pytest.raises(ValueError, match="other tensors"):
        verify_file(original[0], copies[1])
