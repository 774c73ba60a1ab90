"""Logit edits that depend on a row's history: repetition, frequency and presence penalties and
the min_tokens mask. Edits logits the caller owns, in place, touching only the ids a row has seen:
no [rows, vocab] count tensors, no Python loop over tokens, no device sync.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain
from typing import TYPE_CHECKING

import numpy as np
import torch

from ember.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from ember.engine.sampler import SamplingRow


def needs_penalties(params: SamplingParams) -> bool:
    return (params.repetition_penalty != 1.0 or params.presence_penalty != 0.0
            or params.frequency_penalty != 0.0)


def needs_min_tokens_mask(row: SamplingRow) -> bool:
    return len(row.output_token_ids) < row.params.min_tokens and bool(row.min_tokens_suppressed_ids)


def apply_penalties_(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Apply each row's penalties to its row of `logits` ([R, V], contiguous), in vLLM's order.

    repetition_penalty over prompt ∪ output ids (positive logits divided, negative multiplied),
    then frequency_penalty * count and presence_penalty * (count > 0) over output ids only.
    """
    num_rows, vocab_size = logits.shape
    assert num_rows == len(rows) and logits.is_contiguous()
    flat = logits.view(-1)  # [R * V]

    rep_idx = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
    if rep_idx:
        owners = [i for i in rep_idx for _ in range(2)]  # each row's prompt, then its output
        lists = [r.prompt_token_ids if j % 2 == 0 else r.output_token_ids
                 for j, r in enumerate(rows[i] for i in owners)]
        pos, owner = _flat_positions(owners, lists, vocab_size)
        pos_t = to_device_async(torch.from_numpy(pos), logits.device)  # [N]
        penalty = _per_entry([rows[i].params.repetition_penalty for i in owners], owner, logits)
        # NOTE: an id seen twice is written twice with the same value, so it is penalised once.
        seen = flat.index_select(0, pos_t)  # [N]
        edited = torch.where(seen > 0, seen / penalty, seen * penalty)
        # NOTE: an extreme penalty (e.g. 5e-324, found by fuzzing) overflows to +-inf, and an
        # all-inf row samples NaN: keep the penalised logits finite.
        big = torch.finfo(logits.dtype).max
        flat.index_copy_(0, pos_t, edited.clamp_(-big, big))

    out_idx = [i for i, r in enumerate(rows)
               if r.params.frequency_penalty != 0.0 or r.params.presence_penalty != 0.0]
    if out_idx:
        pos, owner = _flat_positions(out_idx, [rows[i].output_token_ids for i in out_idx],
                                     vocab_size)
        if pos.size == 0:
            return
        pos_t = to_device_async(torch.from_numpy(pos), logits.device)  # [N]
        frequency = _per_entry([rows[i].params.frequency_penalty for i in out_idx], owner, logits)
        presence = _per_entry([rows[i].params.presence_penalty for i in out_idx], owner, logits)
        flat.index_add_(0, pos_t, -frequency)  # once per occurrence: frequency * count
        # NOTE: duplicates write one value, so presence applies once per id.
        flat.index_copy_(0, pos_t, flat.index_select(0, pos_t) - presence)


def mask_min_tokens_(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Set min_tokens_suppressed_ids to -inf in rows that have not yet made params.min_tokens."""
    vocab_size = logits.shape[1]
    assert logits.is_contiguous()
    idx = [i for i, r in enumerate(rows) if needs_min_tokens_mask(r)]
    if not idx:
        return
    pos, _ = _flat_positions(idx, [rows[i].min_tokens_suppressed_ids for i in idx], vocab_size)
    pos_t = to_device_async(torch.from_numpy(pos), logits.device)  # [N]
    logits.view(-1).index_fill_(0, pos_t, float("-inf"))


def to_device_async(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host tensor to `device` without making the host wait for the device."""
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def _flat_positions(row_idx: list[int], id_lists: list[list[int]],
                    vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """row * vocab_size + id for every id of id_lists[j] (a list of row row_idx[j]), and each
    entry's j. Built with numpy: converting a Python list is ~7x faster than torch.tensor()."""
    lengths = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))  # [L]
    ids = np.fromiter(chain.from_iterable(id_lists), dtype=np.int64,
                      count=int(lengths.sum()))  # [N]
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"token id out of range [0, {vocab_size}) in a sampling row")
    owner = np.repeat(np.arange(len(id_lists)), lengths)  # [N]
    return np.asarray(row_idx, dtype=np.int64)[owner] * vocab_size + ids, owner


def _per_entry(values: list[float], owner: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """values[owner[n]] for every entry n, as a tensor with like's dtype and device."""
    big = np.finfo(np.float32).max  # an extreme penalty saturates instead of overflowing
    per_entry = np.clip(np.asarray(values, dtype=np.float64), -big, big).astype(np.float32)
    per_entry = per_entry[owner]  # [N]
    return to_device_async(torch.from_numpy(per_entry), like.device).to(like.dtype)
