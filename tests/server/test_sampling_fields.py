"""Every sampling field the server accepts reaches the engine: a seeded request over HTTP gives
the same text as the offline LLM given the same SamplingParams, and /metrics counts what
the response's usage says."""

from __future__ import annotations

import httpx
import pytest

from ember import LLM, SamplingParams
from tests.server.conftest import MODEL_NAME

PROMPT_IDS = [5, 17, 230, 41, 9, 88, 301, 12]
BASE = {"temperature": 0.9, "seed": 11, "max_tokens": 12}


@pytest.fixture(scope="module")
def offline(model_dir):
    # the server's engine options that matter for numerics: fp32 (the model's), one thread
    return LLM(str(model_dir), max_model_len=1024, num_threads=1, kv_cache_memory=4 << 20)


@pytest.mark.parametrize("fields", [
    {"top_k": 3}, {"top_p": 0.5}, {"min_p": 0.2}, {"presence_penalty": 1.5},
    {"frequency_penalty": -1.0}, {"repetition_penalty": 1.8}, {"min_tokens": 12},
    {"stop_token_ids": [7, 8]}, {"ignore_eos": True}, {"n": 2},
])
def test_field_gives_the_offline_engines_output(client, offline, fields):
    body = {**BASE, **fields}
    extra = {k: body.pop(k) for k in ("top_k", "min_p", "repetition_penalty", "min_tokens",
                                      "stop_token_ids", "ignore_eos") if k in body}
    resp = client.completions.create(model=MODEL_NAME, prompt=PROMPT_IDS, extra_body=extra,
                                     **body)
    (expected,) = offline.generate([PROMPT_IDS], SamplingParams(**BASE, **fields))
    assert sorted((c.index, c.text, c.finish_reason) for c in resp.choices) == \
        sorted((o.index, o.text, o.finish_reason) for o in expected.outputs)


def _counters(server) -> dict[str, float]:
    values = {}
    for line in httpx.get(f"{server.url}/metrics", timeout=10).text.splitlines():
        if line.startswith("ember:") and " " in line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_metrics_count_what_usage_reports(client, server):
    before = _counters(server)
    resp = client.completions.create(model=MODEL_NAME, prompt=PROMPT_IDS, max_tokens=5,
                                     extra_body={"ignore_eos": True})
    after = _counters(server)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    labels = '{model_name="tiny"}'
    assert delta(f"ember:prompt_tokens_total{labels}") == resp.usage.prompt_tokens
    assert delta(f"ember:generation_tokens_total{labels}") == resp.usage.completion_tokens == 5
    assert delta(f"ember:time_to_first_token_seconds_count{labels}") == 1
    assert delta(f"ember:e2e_request_latency_seconds_count{labels}") == 1
    # one gap per token after the first, also when the front end took several steps at once
    assert delta(f"ember:inter_token_latency_seconds_count{labels}") == 4
    assert delta('ember:request_success_total{finished_reason="length",model_name="tiny"}') == 1
