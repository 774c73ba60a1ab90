"""A worker killed in the middle of a concurrent trace through `ember router`: requests that
had not started streaming are retried and succeed, streams that had started end with a clear
error event, clients that abort are let go, and every load counter is back at zero after."""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass

import httpx

from tests.router.test_router import RouterProcess, _assert_idle
from tests.server.conftest import MODEL_NAME, ServerProcess, running_server


@dataclass
class Outcome:
    status: int
    worker: str | None
    sent_after_kill: bool = False
    completed: bool = False  # a whole answer (or [DONE] with no error event)
    error: str | None = None  # the error event a stream ended with
    aborted: bool = False


def _body(i: int, stream: bool) -> dict:
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": f"request {i}"}],
            "max_tokens": 300, "ignore_eos": True, "stream": stream}


async def _streamed(client, url, i, killed: asyncio.Event, abort: bool,
                    on_start) -> Outcome:
    sent_after_kill = killed.is_set()
    async with client.stream("POST", f"{url}/v1/chat/completions", json=_body(i, True),
                             headers={"x-session-affinity": f"s{i}"}) as resp:
        out = Outcome(resp.status_code, resp.headers.get("x-ember-worker"), sent_after_kill)
        async for line in resp.aiter_lines():
            if abort:
                out.aborted = True
                return out  # leaving the block closes the connection: the client aborts
            on_start(out.worker)  # (not for aborting streams: the kill must cut a live one)
            if line.startswith("data: {") and '"error"' in line:
                out.error = json.loads(line[6:])["error"]["message"]
            elif line == "data: [DONE]":
                out.completed = out.error is None
    return out


async def _whole(client, url, i, killed: asyncio.Event) -> Outcome:
    sent_after_kill = killed.is_set()
    resp = await client.post(f"{url}/v1/chat/completions", json=_body(i, False),
                             headers={"x-session-affinity": f"s{i}"})
    done = resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 300
    return Outcome(resp.status_code, resp.headers.get("x-ember-worker"), sent_after_kill,
                   completed=done)


async def _trace(router_url: str, victim) -> list[Outcome]:
    """24 requests (a third whole, a few aborted) arriving over 3 s, and 4 more sent once the
    victim is dead; `victim` is killed as soon as a stream on it has sent its first line (on
    a loaded machine that can be after the last of the 24 arrived)."""
    rng = random.Random(0)
    started_on_victim, killed = asyncio.Event(), asyncio.Event()

    def on_start(worker: str | None) -> None:
        if worker == victim.url:
            started_on_victim.set()

    async with httpx.AsyncClient(timeout=120) as client:
        async def one(i: int) -> Outcome:
            if i < 24:
                await asyncio.sleep(rng.random() * 3.0)  # arrivals spread over the kill
            else:
                await asyncio.wait_for(killed.wait(), timeout=60)
            if i % 3 == 2:
                return await _whole(client, router_url, i, killed)
            return await _streamed(client, router_url, i, killed, i % 7 == 0, on_start)

        async def killer() -> None:
            await started_on_victim.wait()
            victim.proc.kill()
            killed.set()

        tasks = [asyncio.create_task(one(i)) for i in range(28)]
        kill = asyncio.create_task(killer())
        outcomes = await asyncio.gather(*tasks)
        assert kill.done()
        return list(outcomes)


def test_a_worker_killed_mid_trace(model_dir):
    c = ServerProcess(model_dir)  # the victim: not checked for a clean exit
    with running_server(model_dir) as a, running_server(model_dir) as b:
        c.wait_ready()
        router = RouterProcess(a.url, b.url, c.url)
        try:
            outcomes = asyncio.run(_trace(router.url, c))
            assert all(o.status == 200 for o in outcomes), [o.status for o in outcomes]
            cut = [o for o in outcomes if o.error is not None]
            assert cut, "no stream was running on the killed worker"
            for o in cut:  # only streams that had started on the victim end in an error
                assert o.worker == c.url and not o.sent_after_kill
                assert c.url in o.error and "mid-stream" in o.error
            for o in outcomes:
                if o.error is None and not o.aborted:
                    assert o.completed, o
            assert any(o.aborted for o in outcomes)
            served_after = {o.worker for o in outcomes if o.sent_after_kill}
            assert served_after
            assert c.url not in served_after
            _assert_idle(router)
        finally:
            router.stop()
            c.stop()
