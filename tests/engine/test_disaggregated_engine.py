"""A prefill EngineCore and a decode EngineCore in one process: the decode core reserves, the
prefill core computes the prompt and writes its KV blocks into the reservation over a real
transport (shared memory; Mooncake in one test), the decode core adopts it and decodes on.
Greedy outputs match one colocated core exactly (fp32).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ember.config import EngineConfig
from ember.engine.engine_core import EngineCore, _sends_layerwise
from ember.engine.messages import EngineCoreRequest
from ember.engine.sampling_params import SamplingParams
from tests.factories import tiny_model_dir


def _core(model_dir, role: str, backend: str = "shm", **options) -> EngineCore:
    # pools of different sizes: block ids must land by the decode pool's layout; on the CPU,
    # since the shm transport maps host memory (a GPU pool needs a CUDA build of Mooncake)
    kv_bytes = (3 << 20) if role == "prefill" else (4 << 20)
    return EngineCore(EngineConfig.from_options(
        str(model_dir), dtype="float32", role=role, kv_transfer_backend=backend,
        kv_cache_memory=kv_bytes, block_size=4, device="cpu", **options))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("disagg"))


@pytest.fixture(scope="module")
def cores(model_dir):
    return _core(model_dir, "both"), _core(model_dir, "prefill"), _core(model_dir, "decode")


def test_greedy_outputs_match_over_mooncake(model_dir):
    """The same hand-off over the Mooncake Transfer Engine (TCP on loopback)."""
    colocated = _core(model_dir, "both")
    prefill, decode = _core(model_dir, "prefill", "mooncake"), _core(model_dir, "decode",
                                                                      "mooncake")
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, n=2)
    try:
        for i, prompt in enumerate(PROMPTS):
            expected = _run(colocated, EngineCoreRequest(f"mc-c{i}", prompt, params, 0.0))
            assert _disaggregated(prefill, decode, f"mc{i}", prompt, params) == expected
        assert prefill.kv_sender.num_bytes_sent > 0
    finally:
        for core in (colocated, prefill, decode):
            core.close()


def _run(core: EngineCore, request: EngineCoreRequest) -> dict[int, list[int]]:
    core.add_request(request)
    tokens: dict[int, list[int]] = {}
    while core.has_unfinished:
        for out in core.step():
            assert out.error is None, out.error
            tokens.setdefault(out.seq_index, []).extend(out.new_token_ids)
    assert not core.take_failures()
    return tokens


def _disaggregated(prefill: EngineCore, decode: EngineCore, rid: str, prompt: list[int],
                   params: SamplingParams) -> dict[int, list[int]]:
    reply = decode.reserve_kv(rid, prompt)
    first = _run(prefill, EngineCoreRequest(
        rid, prompt, SamplingParams(**{**vars(params), "max_tokens": 1}), 0.0,
        {"do_remote_decode": True, "peer": reply["peer"], "block_ids": reply["block_ids"],
         "first_block": reply["first_block"]}))
    first_ids = [first[i][0] for i in range(params.n)]
    return _run(decode, EngineCoreRequest(rid, prompt, params, 0.0,
                                          {"transfer_id": rid, "first_token_ids": first_ids}))


def _failed_remote_prefill(prefill: EngineCore, rid: str, prompt: list[int], peer: dict,
                           reply: dict) -> str:
    """Run a remote prefill whose transfer must fail; returns why it failed."""
    prefill.add_request(EngineCoreRequest(
        rid, prompt, SamplingParams(max_tokens=1), 0.0,
        {"do_remote_decode": True, "peer": peer, "block_ids": reply["block_ids"],
         "first_block": reply["first_block"]}))
    outputs = []
    while prefill.has_unfinished:
        outputs += prefill.step()
    assert outputs == []  # no token leaves a prefill whose KV did not arrive
    ((request_id, why),) = prefill.take_failures()
    assert request_id == rid
    return why


PROMPTS = [list(range(3, 40)), [5, 9, 2, 7] * 5, list(range(50, 61))]


@pytest.mark.parametrize("n", [1, 3])
def test_greedy_outputs_match_a_colocated_core(cores, n):
    colocated, prefill, decode = cores
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, n=n)
    for i, prompt in enumerate(PROMPTS):
        expected = _run(colocated, EngineCoreRequest(f"c{n}-{i}", prompt, params, 0.0))
        got = _disaggregated(prefill, decode, f"d{n}-{i}", prompt, params)
        assert got == expected, prompt
    for core in cores:
        pool = core.scheduler.kv.pool
        assert pool.num_free_blocks == pool.num_blocks  # nothing leaked on either side


def test_an_fp8_cache_hands_off_like_a_colocated_fp8_core(model_dir):
    """Both roles keep fp8 KV (bytes moved as they are); a decode pool of another fp8 format
    is refused with a clear error, and the failure leaks no block."""
    colocated, prefill, decode, other = (
        _core(model_dir, role, kv_cache_dtype=kind) for role, kind in
        (("both", "fp8"), ("prefill", "fp8"), ("decode", "fp8"), ("decode", "fp8_e5m2")))
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, n=2)
    try:
        for i, prompt in enumerate(PROMPTS):
            expected = _run(colocated, EngineCoreRequest(f"f8c{i}", prompt, params, 0.0))
            assert _disaggregated(prefill, decode, f"f8d{i}", prompt, params) == expected
        reply = other.reserve_kv("mismatch", PROMPTS[0])
        why = _failed_remote_prefill(prefill, "mismatch", PROMPTS[0], reply["peer"], reply)
        assert "float8_e5m2" in why and "--kv-cache-dtype" in why
        other.release_kv("mismatch")
        for core in (prefill, decode, other):
            pool = core.scheduler.kv.pool
            assert pool.num_free_blocks == pool.num_blocks
    finally:
        for core in (colocated, prefill, decode, other):
            core.close()


def test_a_decode_worker_is_connected_once(cores, monkeypatch):
    colocated, prefill, decode = cores
    transport = prefill.kv_sender.transport
    calls = []
    connect = transport.connect
    monkeypatch.setattr(transport, "connect", lambda peer: (calls.append(peer), connect(peer)))
    prefill.kv_sender._connected.clear()  # as a freshly started prefill worker
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        got = _disaggregated(prefill, decode, f"once{i}", prompt, params)
        assert got == _run(colocated, EngineCoreRequest(f"once-c{i}", prompt, params, 0.0))
    assert len(calls) == 1 and calls[0]["pid"] == decode.transport.descriptor()["pid"]
    assert prefill.kv_sender.seconds_connecting > 0


def test_a_decode_prefix_hit_is_not_sent_and_still_matches(cores):
    colocated, prefill, decode = cores
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    base = list(range(100, 124))  # 6 full blocks, cached on `decode` by the first run
    _disaggregated(prefill, decode, "warm", base, params)
    sent = prefill.kv_sender.num_blocks_sent
    longer = base + [7, 8, 9, 10, 11]
    reply_blocks = len(longer) // 4 + 1
    got = _disaggregated(prefill, decode, "hit", longer, params)
    assert prefill.kv_sender.num_blocks_sent - sent == reply_blocks - 6
    assert got == _run(colocated, EngineCoreRequest("hit-c", longer, params, 0.0))


def test_a_failed_transfer_fails_the_request_and_frees_both_sides(cores):
    _, prefill, decode = cores
    prompt = list(range(200, 230))
    reply = decode.reserve_kv("fail", prompt)
    dead_peer = {**reply["peer"], "pid_started": -1.0}  # as if the decode worker had died
    why = _failed_remote_prefill(prefill, "fail", prompt, dead_peer, reply)
    assert "KV transfer failed" in why and "not running" in why
    decode.release_kv("fail")
    for core in (prefill, decode):
        assert core.scheduler.kv.pool.num_free_blocks == core.scheduler.kv.pool.num_blocks


def test_roles_refuse_what_they_do_not_do(cores):
    colocated, prefill, decode = cores
    with pytest.raises(ValueError, match="only a 'decode' worker reserves"):
        prefill.reserve_kv("x", [1, 2, 3])
    with pytest.raises(ValueError, match="not 'prefill'"):
        decode.add_request(EngineCoreRequest("y", [1, 2], SamplingParams(), 0.0,
                                             {"do_remote_decode": True}))
    with pytest.raises(ValueError, match="not 'decode'"):
        colocated.add_request(EngineCoreRequest("z", [1, 2], SamplingParams(), 0.0,
                                                {"transfer_id": "t", "first_token_ids": [1]}))
    with pytest.raises(ValueError, match="expired or released"):
        decode.add_request(EngineCoreRequest("w", [1, 2], SamplingParams(), 0.0,
                                             {"transfer_id": "nope", "first_token_ids": [1]}))


_MODES = {True: "layerwise", False: "per-step"}


class _WriteLog:
    """Which writes a prefill core's transport got, and how many were queued by the time its
    last decoder layer started computing."""

    def __init__(self, core: EngineCore, monkeypatch) -> None:
        self.queued: list[int] = []  # bytes per write_async
        self.blocking: list[int] = []  # bytes per blocking write
        self.queued_when_last_layer_ran: list[int] = []
        transport = core.kv_sender.transport
        write, write_async = transport.write, transport.write_async

        def spy_write(peer, segments):
            self.blocking.append(int(segments[:, 2].sum()))
            return write(peer, segments)

        def spy_write_async(peer, segments, ready=None):
            self.queued.append(int(segments[:, 2].sum()))
            return write_async(peer, segments, ready)

        monkeypatch.setattr(transport, "write", spy_write)
        monkeypatch.setattr(transport, "write_async", spy_write_async)
        core.runner.model.layers[-1].register_forward_pre_hook(  # the core is thrown away
            lambda *_: self.queued_when_last_layer_ran.append(len(self.queued)))


@pytest.mark.parametrize("layerwise", [True, False])
def test_layerwise_writes_overlap_the_forward(model_dir, cores, monkeypatch, layerwise):
    colocated, _, decode = cores
    prefill = _core(model_dir, "prefill", kv_send_mode=_MODES[layerwise])
    log = _WriteLog(prefill, monkeypatch)
    num_layers = len(prefill.runner.model.layers)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, n=2)
    prompt = list(range(600 + 100 * layerwise, 637 + 100 * layerwise))  # not cached on decode
    try:
        got = _disaggregated(prefill, decode, f"lw-{layerwise}", prompt, params)
        layout = prefill.kv_sender.layout
    finally:
        prefill.close()
    assert got == _run(colocated, EngineCoreRequest(f"lw-c-{layerwise}", prompt, params, 0.0))
    prompt_bytes = -(-len(prompt) // 4) * layout.block_bytes
    if layerwise:  # one write per layer, all but the last queued before the last layer ran
        assert log.blocking == [] and log.queued == [prompt_bytes // num_layers] * num_layers
        assert log.queued_when_last_layer_ran == [num_layers - 1]
    else:  # one write of every layer, after the forward
        assert log.queued == [] and log.blocking == [prompt_bytes]
    assert prefill.kv_sender.num_bytes_sent == prompt_bytes
    for core in (prefill, decode):
        assert core.scheduler.kv.pool.num_free_blocks == core.scheduler.kv.pool.num_blocks


@pytest.mark.parametrize("layerwise", [True, False])
def test_a_chunked_prompt_is_sent_block_by_block_as_its_chunks_complete(model_dir, cores,
                                                                         layerwise):
    colocated, _, decode = cores
    prefill = _core(model_dir, "prefill", kv_send_mode=_MODES[layerwise],
                    max_num_batched_tokens=8)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    # 37 tokens, not cached on decode: 10 blocks of 4, in chunks of 8 tokens
    prompt = list(range(300 + 100 * layerwise, 337 + 100 * layerwise))
    reply = decode.reserve_kv(f"chunked-{layerwise}", prompt)
    try:
        prefill.add_request(EngineCoreRequest(
            f"chunked-{layerwise}", prompt, SamplingParams(**{**vars(params), "max_tokens": 1}),
            0.0, {"do_remote_decode": True, "peer": reply["peer"],
                  "block_ids": reply["block_ids"], "first_block": reply["first_block"]}))
        sent_after_each_step, first = [], []
        while prefill.has_unfinished:
            for out in prefill.step():
                first += out.new_token_ids
            sent_after_each_step.append(prefill.kv_sender.num_bytes_sent)
        block_bytes = prefill.kv_sender.layout.block_bytes
        assert not prefill.take_failures() and not prefill.kv_sender._sent_upto
    finally:
        prefill.close()
    # each 8-token chunk completes two blocks, sent in its own step; the last sends the rest
    assert sent_after_each_step == [2 * block_bytes * (i + 1) for i in range(4)] \
        + [10 * block_bytes]
    got = _run(decode, EngineCoreRequest(f"chunked-{layerwise}", prompt, params, 0.0,
                                         {"transfer_id": f"chunked-{layerwise}",
                                          "first_token_ids": first}))
    assert got == _run(colocated, EngineCoreRequest(f"chunked-c-{layerwise}", prompt, params,
                                                    0.0))


def test_a_transfer_failing_mid_prompt_stops_the_prompt_there(model_dir, cores):
    _, _, decode = cores
    prefill = _core(model_dir, "prefill", max_num_batched_tokens=8)
    prompt = list(range(800, 837))
    reply = decode.reserve_kv("dead-mid", prompt)
    try:
        prefill.add_request(EngineCoreRequest(
            "dead-mid", prompt, SamplingParams(max_tokens=1), 0.0,
            {"do_remote_decode": True, "peer": {**reply["peer"], "pid_started": -1.0},
             "block_ids": reply["block_ids"], "first_block": reply["first_block"]}))
        assert prefill.step() == []  # the first chunk's blocks could not be sent
        ((request_id, why),) = prefill.take_failures()
        assert request_id == "dead-mid" and "not running" in why
        assert not prefill.has_unfinished  # the rest of the prompt is never computed
        prefill.step()
        assert not prefill.kv_sender._sent_upto
        assert prefill.scheduler.kv.pool.num_free_blocks == prefill.scheduler.kv.pool.num_blocks
    finally:
        prefill.close()
        decode.release_kv("dead-mid")
    assert decode.scheduler.kv.pool.num_free_blocks == decode.scheduler.kv.pool.num_blocks


def test_auto_sends_layerwise_only_from_a_gpu(cores):
    _, prefill, _ = cores
    assert prefill.config.disagg.kv_send_mode == "auto" and not prefill.kv_sender.layerwise
    assert _sends_layerwise(prefill.config, torch.device("cuda"))
    per_step = replace(prefill.config, disagg=replace(prefill.config.disagg,
                                                      kv_send_mode="per-step"))
    assert not _sends_layerwise(per_step, torch.device("cuda"))
    with pytest.raises(ValueError, match="kv_send_mode must be one of"):
        replace(prefill.config.disagg, kv_send_mode="eager").validate()
