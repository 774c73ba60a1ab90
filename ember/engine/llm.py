"""LLM: the offline API, mirroring vLLM's (`LLM(model, **options).generate(prompts, params)`).

Runs the engine core in this process and drives it until every prompt is done.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any

from ember.config import EngineConfig
from ember.engine.engine_core import EngineCore
from ember.engine.messages import EngineCoreRequest
from ember.engine.output_processor import OutputProcessor
from ember.engine.outputs import RequestOutput
from ember.engine.prompts import PromptType, tokenize_prompt
from ember.engine.sampling_params import SamplingParams
from ember.model.tokenizer import load_tokenizer


class LLM:
    def __init__(self, model: str | None = None, **engine_options: Any) -> None:
        if model is None:
            from ember.model.demo import demo_model_dir

            model = str(demo_model_dir())
        self.config = EngineConfig.from_options(str(model), **engine_options)
        self.tokenizer = load_tokenizer(self.config.model.model)
        self.engine = EngineCore(self.config)
        self._processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()

    def close(self) -> None:
        """Finish background work (disk-tier writes); the LLM is not used afterwards."""
        self.engine.close()

    def get_tokenizer(self):
        return self.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in prompt order."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        elif prompts and isinstance(prompts[0], int):  # one prompt of token ids
            prompts = [prompts]
        params_list = self._params_per_prompt(len(prompts), sampling_params)
        request_ids = []
        try:
            for prompt, params in zip(prompts, params_list):
                request_ids.append(self._add(prompt, params))
        except Exception:
            self._abort(request_ids)
            raise
        return self._run_until_done(request_ids)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [
            self.tokenizer.apply_chat_template(conv, tokenize=False,
                                               add_generation_prompt=add_generation_prompt)
            for conv in conversations
        ]
        return self.generate(prompts, sampling_params)

    @staticmethod
    def _params_per_prompt(num_prompts: int, params) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams()] * num_prompts
        if isinstance(params, SamplingParams):
            return [params] * num_prompts
        params = list(params)
        if len(params) != num_prompts:
            raise ValueError(f"sampling_params has {len(params)} entries for {num_prompts} prompts")
        return params

    def _add(self, prompt: PromptType, params: SamplingParams) -> str:
        text, token_ids = tokenize_prompt(self.tokenizer, prompt)
        request_id = str(next(self._ids))
        self.engine.add_request(EngineCoreRequest(request_id, token_ids, params, time.monotonic()))
        self._processor.add_request(request_id, text, token_ids, params)
        return request_id

    def _abort(self, request_ids: list[str]) -> None:
        self.engine.abort_requests(request_ids)
        for request_id in request_ids:
            self._processor.abort(request_id)

    def _run_until_done(self, request_ids: list[str]) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        try:
            while self.engine.has_unfinished:
                outputs, stops = self._processor.process(self.engine.step())
                for stop in stops:
                    self.engine.stop_sequence(stop.request_id, stop.seq_index, stop.stop_str)
                for out in outputs:
                    if out.finished:
                        results[out.request_id] = out
        except BaseException:
            self._abort([r for r in request_ids if r not in results])
            raise
        return [results[r] for r in request_ids]
