"""A prefill EngineCore and a decode EngineCore in one process: the decode core reserves, the
prefill core computes the prompt and writes its KV blocks into the reservation over a real
transport (shared memory; Mooncake in one test), the decode core adopts it and decodes on.
Greedy outputs match one colocated core exactly (fp32).
"""

from __future__ import annotations

import pytest

from ember.config import EngineConfig
from ember.engine.engine_core import EngineCore
from ember.engine.messages import EngineCoreRequest
from ember.engine.sampling_params import SamplingParams
from tests.factories import tiny_model_dir


def _core(model_dir, role: str, backend: str = "shm") -> EngineCore:
    # pools of different sizes: block ids must land by the decode pool's layout; on the CPU,
    # since the shm transport maps host memory (a GPU pool needs a CUDA build of Mooncake)
    kv_bytes = (3 << 20) if role == "prefill" else (4 << 20)
    return EngineCore(EngineConfig.from_options(
        str(model_dir), dtype="float32", role=role, kv_transfer_backend=backend,
        kv_cache_memory=kv_bytes, block_size=4, device="cpu"))


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
    prefill.add_request(EngineCoreRequest(
        "fail", prompt, SamplingParams(max_tokens=1), 0.0,
        {"do_remote_decode": True, "peer": dead_peer, "block_ids": reply["block_ids"],
         "first_block": reply["first_block"]}))
    outputs = []
    while prefill.has_unfinished:
        outputs += prefill.step()
    assert outputs == []  # no token leaves a prefill whose KV did not arrive
    ((request_id, why),) = prefill.take_failures()
    assert request_id == "fail" and "KV transfer failed" in why and "not running" in why
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
