"""The engine-core process's protocol, driven over real ZeroMQ sockets with plain sync clients.

The core runs a FakeEngine (the real scheduler and KV bookkeeping, a deterministic "model"),
so these tests need no torch in the child and can inject step failures.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import psutil
import pytest
import zmq

from ember.config import EngineConfig
from ember.engine.core_process import start_core_process
from ember.engine.kv_cache_manager import KVCacheManager
from ember.engine.messages import (
    ClientMsg,
    CoreMsg,
    EngineCoreFailure,
    EngineCoreOutput,
    EngineCoreReady,
    EngineCoreRequest,
    EngineCoreStats,
    decode_msg,
    encode_msg,
)
from ember.engine.prompts import check_token_ids
from ember.engine.request import FinishReason, Request
from ember.engine.sampling_params import SamplingParams
from ember.engine.scheduler import Scheduler
from ember.engine.scheduler_output import RunnerOutput, SampledToken

VOCAB = 1024
FAIL_TOKEN = 999  # a prompt holding it makes FakeEngine.step() raise
EOS = 4


@dataclass
class FakeModelInfo:
    vocab_size: int = VOCAB
    eos_token_ids: list[int] = field(default_factory=lambda: [EOS])
    dtype: Any = "fake"


@dataclass
class FakeRuntime:
    device: str = "cpu"
    num_blocks: int = 64
    block_size: int = 4
    max_model_len: int = 64


class FakeEngine:
    """EngineCore's interface over the real Scheduler; "samples" (last token + 1 + seq index).

    `step_delay_s` stands in for a forward's duration.
    """

    def __init__(self, config: EngineConfig, step_delay_s: float = 0.0,
                 fail_on_start: bool = False) -> None:
        if fail_on_start:
            raise ValueError("fake model has no weights")
        self.model_info = FakeModelInfo()
        self.runtime = FakeRuntime(max_model_len=config.model.max_model_len or 64)
        self.scheduler = Scheduler(config.scheduler, KVCacheManager(self.runtime.num_blocks,
                                                                    self.runtime.block_size),
                                   self.runtime.max_model_len)
        self.step_delay_s = step_delay_s

    def add_request(self, req: EngineCoreRequest) -> None:
        check_token_ids(req.prompt_token_ids, VOCAB)
        self.scheduler.add_request(Request(req.request_id, req.prompt_token_ids, req.params,
                                           req.arrival_time, eos_token_ids=(EOS,)))

    def abort_requests(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.scheduler.abort_request(request_id)

    kv_sender = None

    def take_failures(self) -> list[tuple[str, str]]:
        return []

    def stop_sequence(self, request_id: str, seq_index: int, stop_reason: str | None) -> None:
        request = self.scheduler.requests.get(request_id)
        if request is not None and seq_index < len(request.sequences):
            self.scheduler.finish_sequence(request.sequences[seq_index], FinishReason.STOP,
                                           stop_reason)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    def step(self) -> list[EngineCoreOutput]:
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        if any(FAIL_TOKEN in c.seq.request.prompt_token_ids for c in sched.chunks):
            raise RuntimeError("injected failure")
        time.sleep(self.step_delay_s)
        sampled = {s.seq_id: SampledToken(next_fake_token(c.seq.token_ids[-1], s.index))
                   for c in sched.chunks for s in c.sample_seqs}
        outputs = []
        for update in self.scheduler.update(sched, RunnerOutput(sampled)):
            seq = update.seq
            out = EngineCoreOutput(seq.request.request_id, seq.index, update.new_token_ids)
            if update.finished:
                out.finish_reason, out.stop_reason = seq.finish_reason.value, seq.stop_reason
            outputs.append(out)
        return outputs


def next_fake_token(last_token: int, seq_index: int = 0) -> int:
    token = (last_token + 1 + seq_index) % VOCAB
    return token + 1 if token == EOS else token  # never EOS: lengths are max_tokens


def fake_continuation(prompt: list[int], max_tokens: int) -> list[int]:
    tokens = [prompt[-1]]
    for _ in range(max_tokens):
        tokens.append(next_fake_token(tokens[-1]))
    return tokens[1:]


class CoreHarness:
    """Binds the client's two sockets, spawns the core, and speaks the protocol synchronously."""

    def __init__(self, engine_factory: Any, ipc_dir: str | None = None, **options: Any) -> None:
        self.ipc_dir = ipc_dir or tempfile.mkdtemp(prefix="ember-test-")
        self.ctx = zmq.Context()
        self.input = self.ctx.socket(zmq.PUSH)
        self.output = self.ctx.socket(zmq.PULL)
        self.input.bind(f"ipc://{self.ipc_dir}/in")
        self.output.bind(f"ipc://{self.ipc_dir}/out")
        config = EngineConfig.from_options("fake-model", **options)
        self.proc = start_core_process(config, f"ipc://{self.ipc_dir}/in",
                                       f"ipc://{self.ipc_dir}/out", engine_factory)

    def send(self, kind: str, payload: Any = None) -> None:
        self.input.send(encode_msg(kind, payload))

    def add(self, request_id: str, prompt: list[int], **params: Any) -> None:
        req = EngineCoreRequest(request_id, prompt, SamplingParams(**params), time.monotonic())
        self.send(ClientMsg.ADD, req.to_wire())

    def recv(self, timeout_s: float = 10.0) -> tuple[str, Any]:
        if not self.output.poll(int(timeout_s * 1000)):
            raise TimeoutError("no message from the engine core")
        return decode_msg(self.output.recv())

    def stats(self) -> EngineCoreStats:
        self.send(ClientMsg.GET_STATS)
        while True:
            kind, payload = self.recv()
            if kind == CoreMsg.STATS:
                return EngineCoreStats.from_wire(payload)

    def collect(self, request_ids: set[str]) -> tuple[dict[str, list[EngineCoreOutput]],
                                                       list[list[EngineCoreOutput]]]:
        """Outputs per request until each finished or errored, and the messages they came in."""
        per_request: dict[str, list[EngineCoreOutput]] = {r: [] for r in request_ids}
        messages = []
        open_ids = set(request_ids)
        while open_ids:
            kind, payload = self.recv()
            assert kind == CoreMsg.OUTPUTS, (kind, payload)
            outs = [EngineCoreOutput.from_wire(w) for w in payload]
            messages.append(outs)
            for out in outs:
                per_request[out.request_id].append(out)
                if out.finish_reason is not None or out.error is not None:
                    open_ids.discard(out.request_id)
        return per_request, messages

    def close(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.input.close(linger=0)
        self.output.close(linger=0)
        self.ctx.term()
        shutil.rmtree(self.ipc_dir, ignore_errors=True)


def started(harness: CoreHarness) -> EngineCoreReady:
    kind, payload = harness.recv(timeout_s=60)
    assert kind == CoreMsg.READY, payload
    return EngineCoreReady.from_wire(payload)


@pytest.fixture(scope="module")
def core():
    harness = CoreHarness(functools.partial(FakeEngine, step_delay_s=0.005), max_num_seqs=16,
                          max_num_batched_tokens=64)
    harness.ready = started(harness)
    yield harness
    harness.close()


def test_ready_handshake_carries_model_info_and_runtime(core):
    ready = core.ready
    assert ready.pid == core.proc.pid
    assert ready.runtime["num_blocks"] == 64 and ready.runtime["block_size"] == 4
    assert ready.model_info["vocab_size"] == VOCAB and ready.model_info["eos_token_ids"] == [EOS]


def test_outputs_stream_one_message_per_step(core):
    prompts = {"a": [10, 11, 12], "b": [20], "c": [30, 31, 32, 33, 34]}
    # the first two run long enough to still be decoding when "c" joins on a busy machine
    max_tokens = {"a": 30, "b": 30, "c": 6}
    for request_id, prompt in prompts.items():
        core.add(request_id, prompt, max_tokens=max_tokens[request_id])
    per_request, messages = core.collect(set(prompts))
    for request_id, prompt in prompts.items():
        outs = per_request[request_id]
        assert [t for o in outs for t in o.new_token_ids] == \
            fake_continuation(prompt, max_tokens[request_id])
        assert outs[-1].finish_reason == "length" and all(o.error is None for o in outs)
    for outs in messages:  # one step per message: at most one output per sequence
        keys = [(o.request_id, o.seq_index) for o in outs]
        assert len(keys) == len(set(keys))
    assert max(len(outs) for outs in messages) == 3  # the three decode together
    stats = core.stats()
    assert stats.num_requests == 0 and stats.num_free_blocks == stats.num_blocks


def test_bad_request_is_refused_and_the_loop_serves_on(core):
    core.add("ok", [1, 2, 3], max_tokens=4)
    core.add("too-long", list(range(5, 105)), max_tokens=4)
    core.add("bad-id", [1, 5000], max_tokens=4)
    core.send(ClientMsg.ADD, {"request_id": "malformed"})
    per_request, _ = core.collect({"ok", "too-long", "bad-id", "malformed"})
    assert "max_model_len" in per_request["too-long"][0].error
    assert "vocabulary" in per_request["bad-id"][0].error
    assert "KeyError" in per_request["malformed"][0].error
    assert [t for o in per_request["ok"] for t in o.new_token_ids] == fake_continuation([1, 2, 3],
                                                                                        4)


def test_step_failure_aborts_in_flight_requests_and_is_reported(core):
    core.add("long", [40, 41], max_tokens=200)
    kind, payload = core.recv()  # "long" is running
    assert kind == CoreMsg.OUTPUTS
    core.add("poison", [FAIL_TOKEN], max_tokens=4)
    while True:
        kind, payload = core.recv()
        if kind == CoreMsg.FAILURE:
            break
    failure = EngineCoreFailure.from_wire(payload)
    assert set(failure.request_ids) == {"long", "poison"} and not failure.is_fatal
    assert "injected failure" in failure.error
    stats = core.stats()
    assert stats.num_requests == 0 and stats.num_free_blocks == stats.num_blocks
    core.add("after", [7], max_tokens=3)  # the core is still serving
    per_request, _ = core.collect({"after"})
    assert [t for o in per_request["after"] for t in o.new_token_ids] == [8, 9, 10]


def test_abort_and_stop_free_blocks(core):
    core.add("aborted", [50, 51, 52, 53, 54, 55], max_tokens=40)
    core.add("stopped", [60], max_tokens=40)
    core.recv()
    busy = core.stats()
    assert busy.num_requests == 2 and busy.num_free_blocks < busy.num_blocks
    core.send(ClientMsg.ABORT, ["aborted"])
    core.send(ClientMsg.STOP, [["stopped", 0, "stop!"]])
    stats = core.stats()
    assert stats.num_requests == 0 and stats.num_running == 0
    assert stats.num_free_blocks == stats.num_blocks
    assert stats.num_steps > 0 and stats.num_generated_tokens > 0


def test_shutdown_message_exits_cleanly():
    harness = CoreHarness(FakeEngine)
    try:
        started(harness)
        harness.send(ClientMsg.SHUTDOWN)
        harness.proc.join(10)
        assert harness.proc.exitcode == 0
    finally:
        harness.close()


def test_start_failure_is_reported():
    harness = CoreHarness(functools.partial(FakeEngine, fail_on_start=True))
    try:
        kind, payload = harness.recv(timeout_s=60)
        assert kind == CoreMsg.START_FAILED
        assert payload == {"error_type": "ValueError", "message": "fake model has no weights"}
        harness.proc.join(10)
        assert harness.proc.exitcode == 1
    finally:
        harness.close()


def _parent_of_core(pid_queue: Any, ipc_dir: str) -> None:
    harness = CoreHarness(FakeEngine, ipc_dir)
    started(harness)
    pid_queue.put(harness.proc.pid)
    time.sleep(600)


def test_core_exits_when_its_parent_dies(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    pid_queue = ctx.Queue()
    # not a daemon: daemonic processes may not start children
    parent = ctx.Process(target=_parent_of_core, args=(pid_queue, str(tmp_path)))
    parent.start()
    try:
        core_pid = pid_queue.get(timeout=60)
        os.kill(parent.pid, signal.SIGKILL)
        parent.join(10)
        deadline = time.monotonic() + 10
        while _is_running(core_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _is_running(core_pid)
    finally:
        if parent.is_alive():
            parent.kill()


def _is_running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
