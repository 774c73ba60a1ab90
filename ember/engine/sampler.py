"""The sampler: one token per row of a batch of logits, vectorised over the batch, plus the
chosen tokens' logprobs. Owns penalties -> temperature -> top-k/top-p/min-p -> draw; it must not
loop over the vocabulary in Python, nor sync with the device before its final copy to the host.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from ember.engine.penalties import (
    apply_penalties_,
    mask_min_tokens_,
    needs_min_tokens_mask,
    needs_penalties,
    to_device_async,
)
from ember.engine.sampling_params import SamplingParams

# On the CPU, top-p without top-k first tries the best _CPU_TOP_P_PROBE_K tokens (topk is ~25x
# cheaper than a full sort there) and sorts the whole vocabulary only when their mass falls short
# of top_p. Checking that reads a value back, so devices always sort, which is cheap on a GPU.
_CPU_TOP_P_PROBE_K = 128
_DRAW_BLOCK = 256  # whole-vocabulary draws pick a block of this many ids, then an id within it
_TINY = torch.finfo(torch.float64).tiny


@dataclass
class SamplingRow:
    """One row of logits to sample from, with the history its penalties and min_tokens need."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # tokens this sequence has generated so far
    generator: torch.Generator | None  # per-sequence seeded generator; None: unseeded
    min_tokens_suppressed_ids: list[int]  # -inf while len(output_token_ids) < params.min_tokens


@dataclass
class SamplerOutput:
    """Per row: the chosen token and, for rows whose params.logprobs is set, its raw logprob.

    Logprobs are of the raw model distribution (log_softmax of the logits as given, before
    penalties and temperature). Rows that did not ask get nan, rank 0 and empty top lists; the
    logprob fields are None when no row asked.
    """

    token_ids: list[int]  # [R]
    logprobs: list[float] | None  # [R]
    ranks: list[int] | None  # [R]; 1 = most likely, tied tokens share the better rank
    top_token_ids: list[list[int]] | None  # [R][params.logprobs], best first
    top_logprobs: list[list[float]] | None  # matching top_token_ids


def make_generator(seed: int, seq_index: int,
                   device: torch.device | str = "cpu") -> torch.Generator:
    """Per-sequence generator: sequence i of an n > 1 request gets a distinct stream derived from
    (seed, i), the same in every process (a fixed hash, not Python's salted hash())."""
    digest = hashlib.blake2b(f"{seed}:{seq_index}".encode(), digest_size=8).digest()
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
    return generator


def compute_token_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, num_top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logprobs of token_ids under log_softmax(logits), vectorised over rows.

    logits [N, V], token_ids [N] -> (token_logprobs [N], ranks [N] (1 = most likely; tied tokens
    share the better rank), top_ids [N, num_top], top_logprobs [N, num_top], best first).
    """
    logprobs = logits.float().log_softmax(dim=-1)  # [N, V]
    token_logprobs = logprobs.gather(1, token_ids[:, None]).squeeze(1)  # [N]
    ranks = (logprobs > token_logprobs[:, None]).sum(dim=-1) + 1  # [N]
    top_logprobs, top_ids = logprobs.topk(min(num_top, logprobs.shape[1]), dim=-1)  # [N, T]
    return token_logprobs, ranks, top_ids, top_logprobs


class Sampler:
    """Stateless: one call per engine step, one device-to-host copy per call."""

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [len(rows)={len(rows)}, vocab], "
                             f"got {tuple(logits.shape)}")
        raw = logits.float()  # [R, V]; the same tensor when already float32
        x = raw
        if any(needs_penalties(r.params) or needs_min_tokens_mask(r) for r in rows):
            x = raw.clone(memory_format=torch.contiguous_format)  # [R, V], edited in place
            apply_penalties_(x, rows)
            mask_min_tokens_(x, rows)

        greedy_idx = [i for i, r in enumerate(rows) if r.params.is_greedy]
        truncated_idx, full_idx = [], []
        for i, r in enumerate(rows):
            if not r.params.is_greedy:
                is_truncated = 0 < r.params.effective_top_k < x.shape[1] or r.params.top_p < 1.0
                (truncated_idx if is_truncated else full_idx).append(i)

        token_ids = _argmax(x) if greedy_idx else x.new_empty(len(rows), dtype=torch.long)  # [R]
        for idx, sample in ((full_idx, _sample_full), (truncated_idx, _sample_truncated)):
            if idx:
                group = [rows[i] for i in idx]
                idx_t = to_device_async(torch.tensor(idx), x.device)  # [G]
                x_group = x if len(idx) == len(rows) else x.index_select(0, idx_t)  # [G, V]
                token_ids.index_copy_(0, idx_t, sample(x_group, group))

        logprob_idx = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        if not logprob_idx:
            return SamplerOutput(token_ids.tolist(), None, None, None, None)
        num_top = max(rows[i].params.logprobs for i in logprob_idx)
        if len(logprob_idx) == len(rows):
            stats = compute_token_logprobs(raw, token_ids, num_top)
        else:
            idx_t = to_device_async(torch.tensor(logprob_idx), x.device)  # [L]
            stats = compute_token_logprobs(raw.index_select(0, idx_t), token_ids[idx_t], num_top)
        host = _to_host([token_ids, *stats])
        return _output(rows, logprob_idx, *(t.tolist() for t in host))


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """[R, V] -> [R] index of each row's first maximum."""
    if x.device.type == "cpu":
        # NOTE: torch's CPU argmax is a scalar loop, ~13x slower than numpy's SIMD argmax at
        # [64, 32000]; both return the first maximum.
        return torch.from_numpy(x.detach().numpy().argmax(axis=-1))
    return x.argmax(dim=-1)


def _draw_uniforms(rows: list[SamplingRow], device: torch.device) -> torch.Tensor:
    """[G] float64 in [0, 1): a seeded row's from its own generator, the rest in one draw."""
    seeded = [(i, r.generator) for i, r in enumerate(rows) if r.generator is not None]
    if len(seeded) == len(rows):
        u = torch.empty(len(rows), dtype=torch.float64, device=device)
    else:
        u = torch.rand(len(rows), dtype=torch.float64, device=device)
    if seeded:
        draws = [torch.rand(1, dtype=torch.float64, generator=g, device=g.device)
                 for _, g in seeded]
        idx_t = to_device_async(torch.tensor([i for i, _ in seeded]), device)
        u.index_copy_(0, idx_t, torch.cat(draws).to(device))
    return u


def _row_values(rows: list[SamplingRow], device: torch.device, *names: str) -> torch.Tensor:
    """[len(names), G] float64: the named SamplingParams fields of each row."""
    values = [[float(getattr(r.params, name)) for r in rows] for name in names]
    return to_device_async(torch.tensor(values, dtype=torch.float64), device)


def _invert_cdf(cdf: torch.Tensor, u: torch.Tensor, num_kept: torch.Tensor | None) -> torch.Tensor:
    """Inverse-CDF draw over the first num_kept columns (all if None) of cdf [G, K] (a running
    sum of non-negative weights): [G] column index, never one whose weight is 0."""
    if num_kept is None:
        total = cdf[:, -1]  # [G]
    else:
        total = cdf.gather(1, (num_kept - 1)[:, None]).squeeze(1)  # [G]
    # NOTE: 0 < target <= total, so the first column with cdf >= target has positive weight and
    # lies within the kept prefix.
    target = (u * total).clamp_min_(_TINY)  # [G]
    return torch.searchsorted(cdf, target[:, None]).squeeze(1)  # [G]


def _sample_full(x: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Temperature and min-p over the whole vocabulary: x [G, V] -> [G] token ids."""
    u = _draw_uniforms(rows, x.device)  # [G]
    temperature, min_p = _row_values(rows, x.device, "temperature", "min_p").float()  # [G] each
    weights = (x - x.amax(dim=-1, keepdim=True)).div_(temperature[:, None]).exp_()  # [G, V]
    if any(r.params.min_p > 0.0 for r in rows):
        # weights are probabilities relative to the most likely token, which min_p bounds.
        weights.masked_fill_(weights < min_p[:, None], 0.0)
    return _draw_blocked(weights, u)


def _draw_blocked(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw from non-negative weights [G, V] with u [G]: [G] column index.

    Two levels, so no [G, V] float64 running sum is built: a block by the blocks' float64 masses,
    then a column by the running sum within that block. Exact: given its block, the leftover
    of the target is uniform over the block's mass.
    """
    vocab_size = weights.shape[1]
    block_mass = _block_masses(weights)  # [G, num_blocks]
    block_cdf = block_mass.cumsum(dim=-1)  # [G, num_blocks]
    target = (u * block_cdf[:, -1]).clamp_min_(_TINY)  # [G]
    block = torch.searchsorted(block_cdf, target[:, None])  # [G, 1], positive mass
    mass_before = block_cdf.gather(1, block) - block_mass.gather(1, block)  # [G, 1]
    leftover = ((target[:, None] - mass_before) / block_mass.gather(1, block)).clamp_(0.0, 1.0)

    columns = block * _DRAW_BLOCK + torch.arange(_DRAW_BLOCK, device=weights.device)  # [G, B]
    in_block = weights.gather(1, columns.clamp_max(vocab_size - 1))  # [G, B]
    in_block.masked_fill_(columns >= vocab_size, 0.0)
    in_block_cdf = in_block.cumsum(dim=-1, dtype=torch.float64)  # [G, B]
    return block.squeeze(1) * _DRAW_BLOCK + _invert_cdf(in_block_cdf, leftover.squeeze(1), None)


def _block_masses(weights: torch.Tensor) -> torch.Tensor:
    """[G, V] -> [G, ceil(V / _DRAW_BLOCK)] float64 sums of consecutive blocks of columns
    (float32 within a block: a float64 sum would first copy all of weights to float64)."""
    num_rows, vocab_size = weights.shape
    num_full = vocab_size // _DRAW_BLOCK
    full = weights[:, : num_full * _DRAW_BLOCK].view(num_rows, num_full, _DRAW_BLOCK)
    masses = [full.sum(dim=-1)]  # [G, num_full]
    if vocab_size % _DRAW_BLOCK:
        masses.append(weights[:, num_full * _DRAW_BLOCK :].sum(dim=-1, keepdim=True))  # [G, 1]
    return torch.cat(masses, dim=1).double()


def _sample_truncated(x: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Temperature, then top-k, top-p, min-p, drawn among the best K tokens: x [G, V] -> [G]."""
    vocab_size = x.shape[1]
    top_ks = [k if 0 < k < vocab_size else 0 for k in (r.params.effective_top_k for r in rows)]
    needs_vocab_top_p = any(k == 0 for k in top_ks)  # a top-p row with no top-k to bound it
    num_candidates = max(top_ks)
    if needs_vocab_top_p:
        probe = max(num_candidates, _CPU_TOP_P_PROBE_K)
        num_candidates = probe if x.device.type == "cpu" and probe < vocab_size else vocab_size
    u = _draw_uniforms(rows, x.device)  # [G]
    temperature, top_p, min_p = _row_values(rows, x.device, "temperature", "top_p", "min_p")
    top_k = to_device_async(torch.tensor(top_ks), x.device)  # [G]
    token_ids = _sample_among_best(x, num_candidates, u, temperature, top_k, top_p, min_p,
                                   check_coverage=needs_vocab_top_p)
    if token_ids is None:
        token_ids = _sample_among_best(x, vocab_size, u, temperature, top_k, top_p, min_p,
                                       check_coverage=False)
    return token_ids


def _sample_among_best(
    x: torch.Tensor, num_candidates: int, u: torch.Tensor, temperature: torch.Tensor,
    top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor, check_coverage: bool,
) -> torch.Tensor | None:
    """Draw among each row's num_candidates best tokens (sorted, so every truncation keeps a
    prefix). None when a top-p row without top-k has its nucleus reaching past the candidates."""
    vocab_size = x.shape[1]
    if num_candidates < vocab_size:
        values, ids = x.topk(num_candidates, dim=-1)  # [G, K], best first
    else:
        values, ids = x.sort(dim=-1, descending=True)  # [G, V]
    temperature = temperature.float()[:, None]  # [G, 1]
    weights = (values - values[:, :1]).div_(temperature).exp_()  # [G, K], weights[:, 0] == 1
    cdf = weights.cumsum(dim=-1, dtype=torch.float64)  # [G, K]

    has_top_k = top_k > 0  # [G]
    num_kept = torch.where(has_top_k, top_k, num_candidates)  # [G]
    # top-p renormalises over the top-k survivors, or over the whole vocabulary without top-k.
    total = cdf.gather(1, (num_kept - 1)[:, None]).squeeze(1)  # [G]
    if num_candidates < vocab_size and check_coverage:
        vocab_total = _block_masses((x - values[:, :1]).div_(temperature).exp_()).sum(dim=-1)
        total = torch.where(has_top_k, total, vocab_total)
        is_covered = has_top_k | (cdf[:, -1] >= top_p * total)  # [G]
        if not bool(is_covered.all()):  # NOTE: reads a value back; only ever on the CPU
            return None
    # keep column j while the mass before it is < top_p: the first j with cdf >= top_p * total
    # is the last one kept.
    num_top_p = torch.searchsorted(cdf, (top_p * total)[:, None]).squeeze(1) + 1  # [G]
    num_kept = torch.minimum(num_kept, num_top_p)
    num_min_p = (weights >= min_p.float()[:, None]).sum(dim=-1)  # [G]; weights fall along K
    num_kept = torch.minimum(num_kept, num_min_p).clamp_min_(1)
    return ids.gather(1, _invert_cdf(cdf, u, num_kept)[:, None]).squeeze(1)  # [G]


def _to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """CPU copies of small device tensors through one device-to-host copy (float64 holds every
    token id, rank and float32 logprob exactly)."""
    if all(t.device.type == "cpu" for t in tensors):
        return tensors
    packed = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors]).cpu()
    parts = packed.split([t.numel() for t in tensors])
    return [p.view(t.shape).to(t.dtype) for p, t in zip(parts, tensors, strict=True)]


def _output(rows: list[SamplingRow], logprob_idx: list[int], token_ids: list[int],
            token_logprobs: list[float], ranks: list[int], top_ids: list[list[int]],
            top_logprobs: list[list[float]]) -> SamplerOutput:
    """Spread the logprob results of the rows in logprob_idx over all rows."""
    num_rows = len(rows)
    out_logprobs, out_ranks = [float("nan")] * num_rows, [0] * num_rows
    out_top_ids: list[list[int]] = [[] for _ in range(num_rows)]
    out_top_logprobs: list[list[float]] = [[] for _ in range(num_rows)]
    for j, i in enumerate(logprob_idx):
        num_top = rows[i].params.logprobs
        out_logprobs[i], out_ranks[i] = token_logprobs[j], ranks[j]
        out_top_ids[i], out_top_logprobs[i] = top_ids[j][:num_top], top_logprobs[j][:num_top]
    return SamplerOutput(token_ids, out_logprobs, out_ranks, out_top_ids, out_top_logprobs)
