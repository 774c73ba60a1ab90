"""Every error the API promises, in OpenAI's shape, from a real server; the server keeps serving."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest

from tests.server.conftest import MODEL_NAME, kv_usage, running_server, wait_until

CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def _post(server, path, body, **kwargs):
    return httpx.post(f"{server.url}{path}", json=body, timeout=30, **kwargs)


def _assert_error(resp, status, param=None, contains=""):
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert contains in error["message"]
    if param is not None:
        assert error["param"] == param
    return error


@pytest.mark.parametrize(("body", "param", "contains"), [
    ({**CHAT, "logit_bias": {"1": 5}}, "logit_bias", "logit_bias"),
    ({**CHAT, "temperature": -1}, "temperature", "temperature"),
    ({**CHAT, "top_p": 0}, "top_p", "top_p"),
    ({**CHAT, "n": 0}, "n", "n"),
    ({**CHAT, "messages": []}, "messages", "messages"),
    ({**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, "messages", "role"),
    ({**CHAT, "stream_options": {"include_usage": True}}, None, "stream"),
    ({**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, None, "'g'"),
    ({**CHAT, "response_format": {"type": "xml"}}, "response_format", "response_format"),
    ({**CHAT, "max_tokens": 100000}, "max_tokens", "context length"),
    ({**CHAT, "messages": [{"role": "user", "content": "hello " * 1200}]}, "messages",
     "context length"),
    ({"messages": CHAT["messages"]}, "model", "model"),
])
def test_bad_chat_requests_get_400_naming_the_field(server, body, param, contains):
    _assert_error(_post(server, "/v1/chat/completions", body), 400, param, contains)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("prompt", [[1, 2, 10**6], [[3], [8324309493, 435, 6217077441463]]])
def test_token_ids_outside_the_vocabulary_are_refused(server, stream, prompt):
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 2, "stream": stream}
    _assert_error(_post(server, "/v1/completions", body), 400, contains="vocabulary")


@pytest.mark.parametrize("stop_ids", [[10**6], [2**70]])
def test_stop_token_ids_outside_the_vocabulary_are_refused(server, stop_ids):
    """Found by fuzzing: a huge id broke the engine hand-off (500), and an id past the
    vocabulary under min_tokens failed the engine step."""
    body = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 4, "min_tokens": 2,
            "stop_token_ids": stop_ids}
    error = _assert_error(_post(server, "/v1/completions", body), 400)
    assert "stop_token_ids" in error["message"] or error["param"] == "stop_token_ids"
    assert _post(server, "/v1/completions", {**body, "stop_token_ids": [3]}).status_code == 200


def test_negative_token_ids_are_refused(server):
    body = {"model": MODEL_NAME, "prompt": [[1959, -330], [4]], "max_tokens": 2}
    _assert_error(_post(server, "/v1/completions", body), 400, param="prompt")


def test_invalid_json_and_wrong_types(server):
    resp = httpx.post(f"{server.url}/v1/completions", content=b"{not json", timeout=10,
                      headers={"content-type": "application/json"})
    _assert_error(resp, 400, contains="JSON")
    body = {"model": MODEL_NAME, "prompt": {"a": 1}}
    _assert_error(_post(server, "/v1/completions", body), 400, "prompt")


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-17", messages=CHAT["messages"])
    assert info.value.body["code"] == "model_not_found"


def test_body_too_large_is_413(server):
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * (17 << 20)}]}
    _assert_error(_post(server, "/v1/chat/completions", big), 413, contains="larger")

    def chunks():  # no Content-Length: the limit applies while reading
        for _ in range(17):
            yield b"x" * (1 << 20)

    resp = httpx.post(f"{server.url}/v1/completions", content=chunks(), timeout=30)
    _assert_error(resp, 413)


def test_unknown_route_and_method(server):
    _assert_error(httpx.get(f"{server.url}/v1/nothing", timeout=10), 404)
    _assert_error(httpx.get(f"{server.url}/v1/completions", timeout=10), 405)


def test_server_still_serves_after_errors(client):
    resp = client.chat.completions.create(model=MODEL_NAME, messages=CHAT["messages"],
                                          max_tokens=3)
    assert resp.usage.completion_tokens >= 1


def test_api_key_and_queue_bound(model_dir):
    flags = ["--api-key", "s3cret", "--max-queued-requests", "1", "--max-num-seqs", "1",
             "--max-model-len", "2048"]
    with running_server(model_dir, *flags) as server:
        _assert_error(_post(server, "/v1/chat/completions", CHAT), 401, contains="missing")
        _assert_error(_post(server, "/v1/chat/completions", CHAT,
                            headers={"Authorization": "Bearer nope"}), 401, contains="invalid")
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        auth = {"Authorization": "Bearer s3cret"}
        assert _post(server, "/v1/chat/completions", CHAT, headers=auth).status_code == 200
        _check_queue_bound(server, auth)


def _check_queue_bound(server, auth):
    long = {"model": MODEL_NAME, "prompt": "a", "max_tokens": 2000, "stream": True,
            "ignore_eos": True}
    with httpx.Client(timeout=60, headers=auth) as http, \
            http.stream("POST", f"{server.url}/v1/completions", json=long) as running:
        lines = running.iter_lines()  # NOTE: keep it: a dropped iterator closes the connection
        next(lines)  # the only running slot is taken
        answers = []  # the queued request only needs to wait for the slot: a short one
        queued = threading.Thread(target=lambda: answers.append(_post(
            server, "/v1/completions", {**long, "stream": False, "max_tokens": 4},
            headers=auth)), daemon=True)
        queued.start()
        wait_until(lambda: _waiting(server, auth) >= 1)  # the second waits for the slot
        resp = _post(server, "/v1/completions", {**long, "stream": False}, headers=auth)
        _assert_error(resp, 429, contains="too many")
        assert resp.headers["retry-after"] == "1"
    # leaving the running stream aborts it; the queued one then runs to its end
    queued.join(60)
    assert not queued.is_alive() and answers[0].status_code == 200, answers
    wait_until(lambda: kv_usage(server) == (0.0, 0.0))


def _waiting(server, auth) -> float:
    text = httpx.get(f"{server.url}/metrics", headers=auth, timeout=10).text
    line = next(x for x in text.splitlines() if x.startswith("ember:num_requests_waiting{"))
    return float(line.rsplit(" ", 1)[1])
