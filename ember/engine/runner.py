"""ModelRunner: turns a SchedulerOutput into tensors, runs the forward and samples.

Owns the KV cache tensors and per-sequence sampling generators; knows nothing of queues.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ember.attention.backend import AttentionBackend, BatchLayout
from ember.attention.context import ForwardContext, forward_context
from ember.attention.kv_dtype import as_copyable
from ember.engine.constraint import SamplingConstraint
from ember.engine.cuda_graphs import DecodeGraphs
from ember.engine.sampler import Sampler, SamplingRow, compute_token_logprobs, make_generator
from ember.engine.scheduler_output import (
    PromptLogprobs,
    RunnerOutput,
    SampledToken,
    ScheduledChunk,
    SchedulerOutput,
)
from ember.kv.tiers import KVTiers


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        backend: AttentionBackend,
        kv_pool: torch.Tensor,  # [num_layers, *backend.kv_cache_shape(...)]
        block_size: int,
        device: torch.device,
        constraint: SamplingConstraint,  # e.g. structured output; masks logits around sampling
        decode_graphs: DecodeGraphs | None = None,
        tiers: KVTiers | None = None,  # the prefix cache's CPU/disk tiers
    ) -> None:
        self.model = model
        self.tiers = tiers
        self.constraint = constraint
        self.decode_graphs = decode_graphs
        self.backend = backend
        self.kv_pool = kv_pool
        self.kv_caches = list(kv_pool.unbind(0))
        self.block_size = block_size
        self.device = device
        self.sampler = Sampler()
        self._generators: dict[int, torch.Generator | None] = {}

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput,
                after_layer: Callable[[int], None] | None = None) -> RunnerOutput:
        """`after_layer(i)` runs once layer i's KV is written (see ForwardContext)."""
        for seq_id in sched.finished_seq_ids:
            self._generators.pop(seq_id, None)
        if sched.kv_saves or sched.kv_loads:
            self._transfer_tier_blocks(sched.kv_saves, sched.kv_loads)
        if sched.block_copies:
            self._copy_blocks(sched.block_copies)
        input_ids, positions, layout = self._prepare_inputs(sched.chunks)
        hidden = self._forward(input_ids, positions, layout, after_layer)  # [tokens, hidden]
        sample_idx, prompt_idx = self._logit_rows(sched.chunks)
        logits = self.model.compute_logits(hidden[sample_idx + prompt_idx])  # [rows, vocab]
        result = RunnerOutput(self._sample(sched.chunks, logits[: len(sample_idx)]))
        if prompt_idx:
            result.prompt_logprobs = self._prompt_logprobs(sched.chunks,
                                                           logits[len(sample_idx):])
        return result

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, layout: BatchLayout,
                 after_layer: Callable[[int], None] | None) -> torch.Tensor:
        metadata = self.backend.build_metadata(layout, self.device)
        if (after_layer is None and self.decode_graphs is not None
                and self.decode_graphs.can_run(layout)):
            return self.decode_graphs.run(input_ids, positions)
        with forward_context(ForwardContext(self.backend, metadata, self.kv_caches,
                                            after_layer)):
            return self.model(input_ids, positions)

    def _transfer_tier_blocks(self, saves: list[tuple[int, bytes]],
                              loads: list[tuple[int, bytes]]) -> None:
        """Evicted cached blocks out to the tiers, then tier blocks into their new homes
        (saves first: a block may be evicted and reused for a load in the same step)."""
        assert self.tiers is not None
        axis = self.backend.block_dim + 1
        for block_id, block_hash in saves:  # one host copy per block, owned by the tiers
            self.tiers.save(block_hash, self.kv_pool.select(axis, block_id).to("cpu", copy=True))
        if loads:
            ids = torch.tensor([b for b, _ in loads], device=self.device)
            blocks = torch.stack([self.tiers.load(h) for _, h in loads], dim=axis)
            as_copyable(self.kv_pool).index_copy_(
                axis, ids, as_copyable(blocks).to(self.device, non_blocking=True))

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        block_axis = self.backend.block_dim + 1
        pool = as_copyable(self.kv_pool)
        pool.index_copy_(block_axis, dst, pool.index_select(block_axis, src))

    def _prepare_inputs(self, chunks: list[ScheduledChunk]):
        block_size = self.block_size
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        for chunk in chunks:
            token_ids.extend(chunk.token_ids)
            span = range(chunk.start_pos, chunk.start_pos + chunk.num_tokens)
            positions.extend(span)
            table = chunk.block_ids
            slots.extend(table[p // block_size] * block_size + p % block_size for p in span)
        layout = BatchLayout(
            query_lens=[c.num_tokens for c in chunks],
            context_lens=[c.start_pos + c.num_tokens for c in chunks],
            block_tables=[c.block_ids for c in chunks],
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            block_size=block_size,
        )
        ids = torch.tensor(token_ids, dtype=torch.int64, device=self.device)
        pos = torch.tensor(positions, dtype=torch.int64, device=self.device)
        return ids, pos, layout

    @staticmethod
    def _logit_rows(chunks: list[ScheduledChunk]) -> tuple[list[int], list[int]]:
        """Rows of the flat batch whose logits are needed: one per sample, then prompt rows."""
        sample_idx: list[int] = []
        prompt_idx: list[int] = []
        start = 0
        for chunk in chunks:
            last = start + chunk.num_tokens - 1
            sample_idx.extend([last] * len(chunk.sample_seqs))
            if chunk.prompt_logprob_targets:
                prompt_idx.extend(range(start, start + len(chunk.prompt_logprob_targets)))
            start += chunk.num_tokens
        return sample_idx, prompt_idx

    def _sample(self, chunks: list[ScheduledChunk],
                logits: torch.Tensor) -> dict[int, SampledToken]:
        seqs = [seq for chunk in chunks for seq in chunk.sample_seqs]
        if not seqs:
            return {}
        rows = [
            SamplingRow(
                params=seq.request.params,
                prompt_token_ids=seq.request.prompt_token_ids,
                output_token_ids=seq.output_token_ids,
                generator=self._generator(seq.seq_id, seq.request.params.seed, seq.index),
                min_tokens_suppressed_ids=seq.request.sorted_stop_token_ids,
            )
            for seq in seqs
        ]
        # The sampling-constraint hook. NOTE: constrained rows' logprobs are therefore those of
        # the masked distribution (disallowed tokens at -inf), as in vLLM.
        self.constraint.mask_logits_(seqs, logits)
        out = self.sampler(logits, rows)
        is_final = self.constraint.accept_tokens(seqs, out.token_ids)
        sampled: dict[int, SampledToken] = {}
        for i, seq in enumerate(seqs):
            token = SampledToken(out.token_ids[i], is_final=is_final[i])
            if out.logprobs is not None and rows[i].params.logprobs is not None:
                token.logprob, token.rank = out.logprobs[i], out.ranks[i]
                token.top = list(zip(out.top_token_ids[i], out.top_logprobs[i]))
            sampled[seq.seq_id] = token
        return sampled

    def _generator(self, seq_id: int, seed: int | None, index: int) -> torch.Generator | None:
        if seq_id not in self._generators:
            self._generators[seq_id] = (
                None if seed is None else make_generator(seed, index, self.device)
            )
        return self._generators[seq_id]

    @staticmethod
    def _prompt_logprobs(chunks: list[ScheduledChunk], logits: torch.Tensor
                         ) -> dict[int, PromptLogprobs]:
        targets = [t for c in chunks if c.prompt_logprob_targets for t in c.prompt_logprob_targets]
        num_top = max(c.seq.request.params.prompt_logprobs or 0 for c in chunks
                      if c.prompt_logprob_targets)
        target_t = torch.tensor(targets, dtype=torch.int64, device=logits.device)
        chosen, ranks, top_ids, top_lps = compute_token_logprobs(logits, target_t, num_top)
        chosen, ranks = chosen.tolist(), ranks.tolist()
        top_ids, top_lps = top_ids.tolist(), top_lps.tolist()
        result: dict[int, PromptLogprobs] = {}
        start = 0
        for chunk in chunks:
            n = len(chunk.prompt_logprob_targets or [])
            if not n:
                continue
            k = chunk.seq.request.params.prompt_logprobs or 0
            span = range(start, start + n)
            result[chunk.seq.seq_id] = PromptLogprobs(
                [chosen[i] for i in span], [ranks[i] for i in span],
                [list(zip(top_ids[i][:k], top_lps[i][:k])) for i in span])
            start += n
        return result
