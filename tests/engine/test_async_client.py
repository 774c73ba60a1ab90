"""AsyncEngineClient against a real spawned engine core serving a tiny fp32 Llama.

Streams must match the offline LLM's greedy results; aborts, refusals, core failures and a
killed core must end streams promptly and free the core's KV blocks.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal

import psutil
import pytest

from ember.config import EngineConfig
from ember.engine.async_client import AsyncEngineClient, EngineCoreError, EngineDeadError
from ember.engine.outputs import RequestOutput
from ember.engine.sampling_params import SamplingParams
from tests.engine.test_core_process import FAIL_TOKEN, FakeEngine, fake_continuation
from tests.factories import tiny_model_dir

# NOTE: one torch thread: on a small, busy CI box two threads per process run ~20x slower.
OPTIONS = {"max_model_len": 64, "kv_cache_memory": 2 << 20, "max_num_seqs": 64,
           "max_num_batched_tokens": 256, "num_threads": 1}
PROMPTS = ["hello world", "the cache block", "a", "stream server router engine", "42 is"]
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def client(loop, model_dir):
    config = EngineConfig.from_options(str(model_dir), **OPTIONS)
    client = loop.run_until_complete(AsyncEngineClient.start(config))
    yield client
    loop.run_until_complete(client.shutdown())
    assert not psutil.pid_exists(client.pid)


@pytest.fixture(scope="module")
def offline(model_dir):
    from ember import LLM

    return LLM(str(model_dir), **OPTIONS)


def run(loop: asyncio.AbstractEventLoop, coro):
    return loop.run_until_complete(asyncio.wait_for(coro, TIMEOUT_S))


async def collect(client: AsyncEngineClient, prompt, params: SamplingParams,
                  request_id: str | None = None) -> tuple[list[RequestOutput], RequestOutput]:
    """Every streamed output, and the last one rebuilt from the deltas alone."""
    outs = [out async for out in client.generate(prompt, params, request_id)]
    final = outs[-1]
    for seq in final.outputs:
        deltas = [o.outputs[seq.index] for o in outs]
        assert "".join(d.delta_text for d in deltas) == seq.text
        assert [t for d in deltas for t in d.delta_token_ids] == seq.token_ids
    assert final.finished and not any(o.finished for o in outs[:-1])
    return outs, final


async def wait_until_idle(client: AsyncEngineClient):
    """Stats once the core has no request left (an abort is applied between steps); on a
    loaded 2-core machine that can take a while, so poll for up to 15 s."""
    stats = await client.get_stats()
    for _ in range(1500):
        if stats.num_requests == 0:
            break
        await asyncio.sleep(0.01)
        stats = await client.get_stats()
    return stats


def test_ready_exposes_runtime_and_tokenizer(client, loop):
    stats = run(loop, client.get_stats())
    assert client.runtime["num_blocks"] == stats.num_blocks == stats.num_free_blocks > 0
    assert client.runtime["max_model_len"] == 64 and client.runtime["device"] == "cpu"
    assert client.model_info["vocab_size"] == len(client.tokenizer)


def test_streams_match_offline_greedy(client, offline, loop):
    params = [SamplingParams(temperature=0, max_tokens=4 + 3 * i, ignore_eos=True)
              for i in range(len(PROMPTS))]
    params[-1] = params[-1].clone(max_tokens=40)  # long enough to stream on a busy machine
    expected = offline.generate(PROMPTS, params)

    async def body():
        return await asyncio.gather(*[collect(client, p, sp) for p, sp in zip(PROMPTS, params)])

    results = run(loop, body())
    for (_, final), want in zip(results, expected):
        assert final.outputs[0].token_ids == want.outputs[0].token_ids
        assert final.outputs[0].text == want.outputs[0].text
        assert final.outputs[0].finish_reason == "length"
    # A stream whose reader lags gets its deltas merged, so on a busy machine one short
    # request may arrive as a single output; across all five, some must have streamed.
    assert sum(len(outs) for outs, _ in results) > len(results)


def test_a_lagging_reader_gets_every_steps_arrival_time(client, loop):
    """Steps merged into one output while the caller was busy keep their own arrival times,
    so the server's inter-token latency histogram sees every step."""
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    async def body():
        stream = client.generate("the cache block", params)
        first = await stream.__anext__()
        await wait_until_idle(client)  # every later step arrives before the next read
        return [first] + [out async for out in stream]

    outs = run(loop, body())
    times = [t for out in outs for t in out.step_arrival_times]
    assert len(times) == 6 and times == sorted(times)
    assert len(outs) <= 2 and max(len(out.step_arrival_times) for out in outs) >= 3


def test_many_concurrent_streams_with_stop_strings_and_n(client, offline, loop):
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(48)]
    params = [SamplingParams(temperature=0, max_tokens=2 + i % 9, ignore_eos=True,
                             n=2 if i % 7 == 0 else 1) for i in range(48)]
    params[1] = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    stop_str = offline.generate(prompts[1], params[1])[0].outputs[0].text[5:8]
    params[1] = params[1].clone(stop=[stop_str])
    expected = offline.generate(prompts, params)
    assert expected[1].outputs[0].finish_reason == "stop"

    async def body():
        return await asyncio.gather(*[collect(client, p, sp) for p, sp in zip(prompts, params)])

    results = run(loop, body())
    for (_, final), want in zip(results, expected):
        assert [s.text for s in final.outputs] == [s.text for s in want.outputs]
        assert [s.token_ids for s in final.outputs] == [s.token_ids for s in want.outputs]
        assert [s.finish_reason for s in final.outputs] == [s.finish_reason for s in want.outputs]
    stats = run(loop, wait_until_idle(client))  # stop strings reached the core
    assert stats.num_requests == 0 and stats.num_free_blocks == stats.num_blocks


def test_abort_mid_stream_frees_kv_blocks(client, loop):
    params = SamplingParams(temperature=0, max_tokens=58, ignore_eos=True)

    async def body():
        outs = []
        async for out in client.generate("hello world", params, request_id="to-abort"):
            outs.append(out)
            if len(outs) == 1:  # a lagging reader may get many steps in one output
                busy = await client.get_stats()
                await client.abort("to-abort")
        return outs, busy, await client.get_stats()

    outs, busy, stats = run(loop, body())
    assert busy.num_requests == 1 and busy.num_free_blocks < busy.num_blocks
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
    assert len(outs[-1].outputs[0].token_ids) < 58
    assert stats.num_requests == 0 and stats.num_free_blocks == stats.num_blocks


def test_leaving_the_stream_early_aborts(client, loop):
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)

    async def consume(request_id: str, started: asyncio.Event) -> None:
        async for _ in client.generate("the cache", params, request_id=request_id):
            started.set()

    async def body():
        async for _ in client.generate("hello", params, request_id="broken-off"):
            break
        after_break = await client.get_stats()  # asked after the abort went out
        started = asyncio.Event()
        task = asyncio.create_task(consume("cancelled", started))
        await started.wait()
        task.cancel()  # a disconnecting HTTP client
        with pytest.raises(asyncio.CancelledError):
            await task
        return after_break, await client.get_stats()

    after_break, after_cancel = run(loop, body())
    assert after_break.num_requests == 0
    assert after_cancel.num_requests == 0
    assert after_cancel.num_free_blocks == after_cancel.num_blocks


def test_refused_request_raises_while_others_stream(client, offline, loop):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = offline.generate(["hello world"], params)[0].outputs[0].token_ids

    async def refused():
        with pytest.raises(ValueError, match="max_model_len"):
            async for _ in client.generate(list(range(10, 110)), params):
                pass

    async def body():
        _, (_, final) = await asyncio.gather(refused(), collect(client, "hello world", params))
        first = client.generate("a", params, "dup")
        await first.__anext__()
        with pytest.raises(ValueError, match="already in use"):
            async for _ in client.generate("b", params, "dup"):
                pass
        await first.aclose()
        return final

    assert run(loop, body()).outputs[0].token_ids == expected
    assert run(loop, wait_until_idle(client)).num_requests == 0


def test_step_failure_and_killed_core_raise_instead_of_hanging(model_dir, loop):
    config = EngineConfig.from_options(str(model_dir), max_model_len=64, num_threads=1)
    factory = functools.partial(FakeEngine, step_delay_s=0.005)
    params = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)

    async def long_stream(client: AsyncEngineClient, request_id: str,
                          started: asyncio.Event) -> None:
        async for _ in client.generate([1, 2, 3], params, request_id=request_id):
            started.set()

    async def body() -> int:
        async with AsyncEngineClient.start(config, engine_factory=factory) as client:
            started = asyncio.Event()
            victim = asyncio.create_task(long_stream(client, "victim", started))
            await started.wait()
            with pytest.raises(EngineCoreError, match="injected failure"):
                async for _ in client.generate([FAIL_TOKEN], params):
                    pass
            with pytest.raises(EngineCoreError, match="injected failure"):
                await victim
            # the core serves on after a failed step
            outs, _ = await collect(client, [7, 8], SamplingParams(max_tokens=5))
            assert outs[-1].outputs[0].token_ids == fake_continuation([7, 8], 5)

            started = asyncio.Event()
            victim = asyncio.create_task(long_stream(client, "victim-2", started))
            await started.wait()
            os.kill(client.pid, signal.SIGKILL)
            with pytest.raises(EngineDeadError, match="died unexpectedly"):
                await victim
            with pytest.raises(EngineDeadError):
                client.generate([1], params)
            with pytest.raises(EngineDeadError):
                await client.get_stats()
        return client.pid

    assert not psutil.pid_exists(run(loop, body()))


def test_failed_start_raises_and_leaves_no_process(model_dir, loop):
    config = EngineConfig.from_options(str(model_dir), num_threads=1)
    factory = functools.partial(FakeEngine, fail_on_start=True)
    children = set(psutil.Process().children())
    with pytest.raises(ValueError, match="fake model has no weights"):
        run(loop, AsyncEngineClient.start(config, engine_factory=factory))
    assert set(psutil.Process().children()) <= children
