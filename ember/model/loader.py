"""Validates a Hugging Face model directory and loads it into ember's shared decoder.

Reads config.json through transformers, weights only through safetensors (never unpickles), and
copies each checkpoint tensor straight into its slot of the final, possibly fused, parameter
(decoding it there when `ember compress` wrote the file), except those kept compressed in memory.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ember.compress.codec import default_threads
from ember.compress.format import WeightsFile
from ember.compress.resident import new_resident_model
from ember.model.decoder import DecoderModel
from ember.model.registry import DecoderConfig, pick_architecture, resolve_config
from ember.model.weights import checkpoint_targets, normalize_name

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class ModelInfo:
    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    dtype: torch.dtype
    eos_token_ids: list[int]  # config.json's, then generation_config.json's, de-duplicated
    num_params: int


def load_model(model_dir: str | Path, dtype: str = "auto", device: str | torch.device = "cpu",
               keep_weights_compressed: bool = False) -> tuple[DecoderModel, ModelInfo]:
    """Build the decoder for `model_dir`, fill it from its safetensors; ValueError if unusable.

    keep_weights_compressed: layer weights stored compressed stay so in memory
    (compress/resident.py); they are never decoded here nor given storage of their own.
    """
    model_dir = _check_dir(model_dir)
    hf_config, architecture = read_config(model_dir)
    cfg = resolve_config(hf_config, architecture)
    files = find_weight_files(model_dir)
    torch_dtype = resolve_dtype(dtype, hf_config, files)
    with torch.no_grad():
        skip: Collection[str] = ()
        if keep_weights_compressed:
            model, resident = new_resident_model(cfg, torch_dtype, device, files)
            skip = resident.param_names
        else:
            model = DecoderModel(cfg, torch_dtype, device)
        load_weights(model, files, skip)
    model.eval()
    info = ModelInfo(
        architecture=architecture,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        hidden_size=cfg.hidden_size,
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_position_embeddings,
        dtype=torch_dtype,
        eos_token_ids=read_eos_token_ids(model_dir, hf_config),
        num_params=sum(p.numel() for p in model.parameters()),
    )
    return model, info


def _check_dir(model_dir: str | Path) -> Path:
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise ValueError(f"model directory {str(path)!r} does not exist or is not a directory")
    return path


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def read_config(model_dir: Path) -> tuple[Any, str]:
    """config.json through `AutoConfig` (transformers normalises rope and defaults)."""
    from transformers import AutoConfig

    path = model_dir / "config.json"
    if not path.is_file():
        raise ValueError(f"{model_dir} has no config.json")
    raw = _read_json(path)
    architecture = pick_architecture(raw.get("architectures"))
    try:
        hf_config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as exc:  # transformers raises many types for a bad config
        raise ValueError(f"{path} could not be parsed by transformers: {exc}") from exc
    return hf_config, architecture


def find_weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files to read: the index's shards, else model.safetensors, else all.

    NOTE: some repos also ship a `consolidated.safetensors` in another naming scheme beside the
    HF files; the index or model.safetensors wins over it.
    """
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no 'weight_map'")
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise ValueError(f"{index} lists shard {file.name!r}, which is missing")
        return files
    if (model_dir / "model.safetensors").is_file():
        return [model_dir / "model.safetensors"]
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise ValueError(
            f"{model_dir} holds only pickled weights ({', '.join(pickled)}); ember never "
            "unpickles checkpoints (arbitrary code execution) - convert them to safetensors"
        )
    raise ValueError(f"{model_dir} has no weights (*.safetensors)")


def resolve_dtype(dtype: str, hf_config: Any, files: list[Path]) -> torch.dtype:
    """"auto" takes config.json's dtype (or the checkpoint's); otherwise the named dtype."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    config_dtype = getattr(hf_config, "dtype", None)  # transformers maps legacy torch_dtype here
    if config_dtype is None:
        return _checkpoint_dtype(files[0])
    name = str(config_dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"config.json 'dtype' {name!r} is not supported; pass one of "
                         f"{sorted(DTYPES)} explicitly")
    return DTYPES[name]


def _checkpoint_dtype(file: Path) -> torch.dtype:
    with _open(file) as f:
        for name in f.keys():
            found = _SAFETENSORS_DTYPES.get(f.dtype(name))
            if found is not None:
                return found
    return torch.float32


def _open(file: Path) -> WeightsFile:
    return WeightsFile(file)  # CorruptWeightsError (a ValueError) names the file


def load_weights(model: DecoderModel, files: list[Path], skip: Collection[str] = ()) -> None:
    """Copy every checkpoint tensor into its (fused) parameter slice; all of them must be there.

    A file's tensors are copied (or decoded) by a few threads at once, straight from the mapped
    file into their slices; casting to the model dtype happens in the copy. The tensors of the
    parameters in `skip` (kept compressed) are checked like the others but not copied.
    """
    cfg: DecoderConfig = model.config
    targets = checkpoint_targets(cfg)
    params = dict(model.named_parameters())
    loaded: dict[str, str] = {}  # canonical piece -> file it came from
    for file in files:
        with _open(file) as f:
            jobs = []
            for name in f.keys():
                canonical = normalize_name(name)
                target = targets.get(canonical)
                if target is None:
                    if _is_ignorable(canonical, cfg):
                        continue
                    raise ValueError(f"{file.name}: unexpected tensor {name!r} for "
                                     f"{cfg.architecture} with this config.json")
                for piece in target.pieces:
                    if piece in loaded:
                        raise ValueError(f"{file.name}: tensor {name!r} duplicates {piece!r} "
                                         f"already loaded from {loaded[piece]}")
                dest = params[target.param][target.index]
                shape = f.shape(name)
                if shape != list(dest.shape):
                    raise ValueError(f"{file.name}: tensor {name!r} has shape {shape}, "
                                     f"expected {list(dest.shape)}")
                if target.param not in skip:
                    jobs.append((name, dest))
                loaded.update(dict.fromkeys(target.pieces, file.name))
            _copy_tensors(f, jobs)
    missing = [piece for piece, target in targets.items()
               if target.pieces == (piece,) and piece not in loaded]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"checkpoint is missing tensor {missing[0]!r}{more} "
                         f"in {files[0].parent}")


def _copy_tensors(f: WeightsFile, jobs: list[tuple[str, torch.Tensor]]) -> None:
    """f.copy_into for each (name, dest) over all cores: one tensor per thread, so checksums
    and page faults run in parallel too (ctypes and copy_ release the GIL). Jobs go in name
    order, which is the file's order, so they follow the kernel's read-ahead."""
    threads = min(default_threads(), len(jobs))
    if threads <= 1:
        for name, dest in jobs:
            f.copy_into(name, dest)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="ember-load") as pool:
        for future in [pool.submit(f.copy_into, name, dest, 1) for name, dest in jobs]:
            future.result()


def _is_ignorable(canonical: str, cfg: DecoderConfig) -> bool:
    """Tensors transformers also ignores: rope buffers, and lm_head when it is tied."""
    if canonical.endswith("rotary_emb.inv_freq"):
        return True
    return cfg.tie_word_embeddings and canonical == "lm_head.weight"


def read_eos_token_ids(model_dir: Path, hf_config: Any) -> list[int]:
    ids: list[int] = []
    sources = [getattr(hf_config, "eos_token_id", None)]
    gen_path = model_dir / "generation_config.json"
    if gen_path.is_file():
        sources.append(_read_json(gen_path).get("eos_token_id"))
    for value in sources:
        for token_id in value if isinstance(value, list) else [value]:
            if isinstance(token_id, int) and token_id not in ids:
                ids.append(token_id)
    return ids
