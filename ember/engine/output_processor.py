"""OutputProcessor: front-end side of a request: detokenise, apply stop strings, build outputs.

Runs beside the engine core, never inside its loop; stop strings it finds are sent back as
sequence stops.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ember.engine.detokenizer import IncrementalDetokenizer
from ember.engine.messages import EngineCoreOutput, TokenLogprob
from ember.engine.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from ember.engine.sampling_params import SamplingParams
from ember.engine.stop_checker import StopChecker


@dataclass
class SequenceStop:
    request_id: str
    seq_index: int
    stop_str: str


@dataclass
class _SeqState:
    detokenizer: IncrementalDetokenizer | None
    stop_checker: StopChecker | None
    output: CompletionOutput
    emitted_chars: int = 0  # text already shown to a streaming client
    full_text: str = ""  # detokenised text before truncation at a stop string


@dataclass
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[_SeqState]
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    stops: list[SequenceStop] = field(default_factory=list)
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(s.output.finished for s in self.seqs)


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, _RequestState] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams) -> None:
        seqs = [_SeqState(self._detokenizer(prompt_token_ids, params),
                          StopChecker(params.stop, params.include_stop_str_in_output,
                                      params.min_tokens) if params.stop else None,
                          CompletionOutput(i, logprobs=[] if params.logprobs is not None else None,
                                           cumulative_logprob=0.0 if params.logprobs is not None
                                           else None))
                for i in range(params.n)]
        state = _RequestState(request_id, prompt, prompt_token_ids, params, seqs)
        if params.prompt_logprobs is not None:
            state.prompt_logprobs = [None]
        self.requests[request_id] = state

    def _detokenizer(self, prompt_ids: list[int], params: SamplingParams):
        if not params.detokenize:
            return None
        return IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens)

    def abort(self, request_id: str) -> RequestOutput | None:
        state = self.requests.pop(request_id, None)
        if state is None:
            return None
        for seq in state.seqs:
            if not seq.output.finished:
                seq.output.finish_reason = "abort"
        return self._request_output(state)

    def process(self, outputs: list[EngineCoreOutput]
                ) -> tuple[list[RequestOutput], list[SequenceStop]]:
        """Apply one step's core outputs; returns updated requests and sequences to stop."""
        touched: dict[str, _RequestState] = {}
        stops: list[SequenceStop] = []
        for out in outputs:
            state = self.requests.get(out.request_id)
            if state is None:
                continue
            seq = state.seqs[out.seq_index]
            if seq.output.finished:  # a stop string already ended it; late tokens are dropped
                continue
            seq.output.delta_text, seq.output.delta_token_ids = "", []
            state.num_cached_tokens = out.num_cached_tokens
            if out.prompt_logprobs is not None:
                self._add_prompt_logprobs(state, out.prompt_logprobs)
            if out.new_token_ids:
                stop = self._add_tokens(state, seq, out)
                if stop is not None:
                    stops.append(stop)
            if out.finish_reason is not None and not seq.output.finished:
                seq.output.finish_reason = out.finish_reason
                seq.output.stop_reason = out.stop_reason
            touched[state.request_id] = state
        results = []
        for state in touched.values():
            results.append(self._request_output(state))
            if state.finished:
                del self.requests[state.request_id]
        return results, stops

    def _add_tokens(self, state: _RequestState, seq: _SeqState,
                    out: EngineCoreOutput) -> SequenceStop | None:
        output = seq.output
        output.token_ids.extend(out.new_token_ids)
        output.delta_token_ids = list(out.new_token_ids)
        if out.new_logprobs is not None and output.logprobs is not None:
            for token_id, info in zip(out.new_token_ids, out.new_logprobs):
                output.logprobs.append(self._position_logprobs(token_id, info))
                output.cumulative_logprob += info[0]
        if seq.detokenizer is None:
            return None
        new_text = seq.detokenizer.add_tokens(out.new_token_ids)
        if out.finish_reason is not None:  # an incomplete character at the end shows as U+FFFD
            new_text += seq.detokenizer.flush()
        seq.full_text += new_text
        stop = None
        if seq.stop_checker is not None:
            match = seq.stop_checker.check(seq.full_text, len(new_text), len(output.token_ids))
            if match is not None:
                output.text = seq.full_text[: match.truncate_to]
                output.finish_reason, output.stop_reason = "stop", match.stop_str
                stop = SequenceStop(state.request_id, output.index, match.stop_str)
        if stop is None:
            output.text = seq.full_text
        return stop

    def _position_logprobs(self, token_id: int, info: TokenLogprob) -> PositionLogprobs:
        logprob, rank, top = info
        entry = {token_id: Logprob(logprob, rank, self._decode_one(token_id))}
        for i, (alt_id, alt_lp) in enumerate(top):
            if alt_id not in entry:
                entry[alt_id] = Logprob(alt_lp, i + 1, self._decode_one(alt_id))
        return entry

    def _decode_one(self, token_id: int) -> str:
        return self.tokenizer.backend_tokenizer.decode([token_id], skip_special_tokens=False)

    def _add_prompt_logprobs(self, state: _RequestState, chunk) -> None:
        logprobs, ranks, tops = chunk
        start = len(state.prompt_logprobs)
        for j, (lp, rank, top) in enumerate(zip(logprobs, ranks, tops)):
            token_id = state.prompt_token_ids[start + j]
            state.prompt_logprobs.append(self._position_logprobs(token_id, (lp, rank, top)))

    def _request_output(self, state: _RequestState) -> RequestOutput:
        for seq in state.seqs:
            self._set_delta_text(seq)
        return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids,
                             [s.output for s in state.seqs], state.prompt_logprobs,
                             finished=state.finished, num_cached_tokens=state.num_cached_tokens)

    @staticmethod
    def _set_delta_text(seq: _SeqState) -> None:
        """Streaming text: hold back a tail that could still become a stop string."""
        text = seq.output.text
        visible = len(text)
        if seq.stop_checker is not None and not seq.output.finished:
            visible = max(seq.emitted_chars, len(text) - seq.stop_checker.num_holdback_chars)
        seq.output.delta_text = text[seq.emitted_chars:visible]
        seq.emitted_chars = visible
