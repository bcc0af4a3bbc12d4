"""Abuse of a real server over loopback: concurrent streams, both kinds of disconnect, oversize bodies, extreme
numbers, broken Unicode and unsupported fields; afterwards /metrics must show nothing running or queued.

The model is tiny and random (seeded) with a small BPE tokenizer, so each step is cheap; its stop tokens' head
rows are zero, which under greedy decoding never wins against the other (random) logits, so a request runs
until max_tokens or until it is cancelled, never ending early by chance.
"""

import json
import socket
import threading
import time

import httpx2 as httpx
import pytest
import torch
from model_util import random_model
from server_util import running_server
from train_util import small_tokenizer

from minicpm4.config import ModelConfig
from minicpm4.serve.llm import LLM

pytestmark = pytest.mark.usefixtures("one_thread")
# tokens a request would run for if never cancelled: the tiny model makes ~3000 a second on a quiet core, and a
# request must still be running when the test closes its socket (3000 once finished first)
LONG = 16000


@pytest.fixture(scope="module")
def server(real_text):
    tok = small_tokenizer(real_text)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = random_model(cfg, seed=0)
    llm = LLM(model, tok, max_len=16384, max_slots=8)
    with torch.no_grad():
        model.lm_head.weight[llm.stop_token_ids] = 0
    with running_server(llm, max_tokens=LONG, tool_format="json", max_request_bytes=1 << 20) as (url, srv):
        yield url, srv


def post(url: str, path: str, body, **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body)
    return httpx.post(url + path, content=content, headers={"content-type": "application/json"}, timeout=60, **kw)


def wait_until(cond, what: str, limit: float = 20.0) -> None:
    deadline = time.time() + limit
    while not cond():
        if time.time() > deadline:
            raise AssertionError(f"still not {what} after {limit} s")
        time.sleep(0.02)


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} missing from /metrics")


def raw_request(url: str, path: str, body: bytes, length: int | None = None) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\n\r\n")
    sock.sendall(head.encode())
    return sock


def read_response(sock: socket.socket) -> bytes:
    sock.settimeout(30)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


CHAT = {"messages": [{"role": "user", "content": "Tell me everything."}], "temperature": 0}


def test_concurrent_streams_all_finish(server):
    url, _ = server
    results: dict[int, list[str]] = {}

    def one(i: int) -> None:
        body = {**CHAT, "max_tokens": 20 + i, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            results[i] = [line for line in r.iter_lines() if line.startswith("data: ")]
    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]  # more than max_slots: some queue
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(12):
        lines = results[i]
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["usage"]["completion_tokens"] == 20 + i


def test_every_disconnect_cancels_its_request(server):
    url, srv = server
    cancelled = srv.engine.metrics.requests.get("cancelled", 0)
    # two non-streaming requests, whose clients close the socket while they generate
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": LONG, "temperature": 0}).encode()
    socks = [raw_request(url, "/v1/completions", body) for _ in range(2)]
    for s in socks:
        s.sendall(body)
    wait_until(lambda: srv.engine.running == 2, "running both requests")
    for s in socks:
        s.close()
    wait_until(lambda: srv.engine.running == 0, "freed after a non-streaming disconnect")
    assert srv.engine.metrics.requests.get("cancelled", 0) == cancelled + 2
    # two streaming ones, closed after their first tokens
    for _ in range(2):
        with httpx.stream("POST", url + "/v1/chat/completions", json={**CHAT, "max_tokens": LONG, "stream": True},
                          timeout=60) as r:
            content = (line for line in r.iter_lines() if '"content": "' in line and '"content": ""' not in line)
            next(content)  # generating now
            assert srv.engine.running == 1
        wait_until(lambda: srv.engine.running == 0, "freed after a streaming disconnect")
    assert srv.engine.metrics.requests.get("cancelled", 0) == cancelled + 4
    tokens = metric(url, "minicpm4_generated_tokens_total")
    time.sleep(0.3)  # nothing may still be generating for a gone client
    assert metric(url, "minicpm4_generated_tokens_total") == tokens


def test_oversize_bodies_get_a_readable_413(server):
    url, _ = server
    # declared too big: the server answers before reading, and must still read the body so the client, still
    # sending, gets the answer instead of a reset
    big = b"x" * (5 << 20)
    sock = raw_request(url, "/v1/chat/completions", b"", length=len(big))
    time.sleep(0.2)  # let the server decide on the headers alone, as it would for a slow client
    sock.sendall(big)
    reply = read_response(sock)
    sock.close()
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"request body over" in reply
    # no content-length (chunked): refused once the bound is passed
    chunks = (b"y" * (256 << 10) for _ in range(12))
    r = httpx.post(url + "/v1/completions", content=chunks, timeout=60)
    assert r.status_code == 413 and "request body over" in r.json()["error"]["message"]
    # the server still serves
    assert post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("body, param", [
    ({"seed": 2**64}, "seed"), ({"seed": 2**63}, "seed"), ({"seed": -1}, "seed"),
    ({"max_tokens": 10**30}, None), ({"max_tokens": -1}, "max_tokens"), ({"temperature": 1e308}, "temperature"),
    ({"top_p": float("nan")}, "top_p"), ({"temperature": float("inf")}, "temperature"),
    ({"logprobs": 10**30}, "logprobs"), ({"n": 10**30}, "n"),
    ({"prompt": [10**30]}, None), ({"prompt": [-5]}, None),
    ({"prompt": "caf\udce9"}, "prompt"), ({"stop": ["ok", "\ud800"]}, "stop.1"),
    ({"user": "\udfff"}, "user"), ({"metadata": {"\ud83d": "x"}}, "metadata.\\ud83d"),
    ({"best_of": 3}, "best_of"), ({"suffix": "tail"}, "suffix"), ({"logit_bias": {"5": 100}}, "logit_bias"),
    ({"presence_penalty": 1.5}, "presence_penalty"),
])
def test_hostile_completion_fields_get_400(server, body, param):
    r = post(server[0], "/v1/completions", {"prompt": "hi", "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    if param:
        assert err["param"] == param and param in err["message"]


@pytest.mark.parametrize("messages, extra, param", [
    ([{"role": "user", "content": "hi \ud800 there"}], {}, "messages.0.content"),
    ([{"role": "user", "content": [{"type": "text", "text": "a\udbff"}]}], {}, "messages.0.content.0.text"),
    ([{"role": "user", "content": [{"type": "text", "text": 5}]}], {}, None),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}], {}, None),
    ([{"role": "user", "content": "hi"}], {"tools": [{"type": "function", "function": {
        "name": "f", "description": "\ud800"}}]}, "tools.0.function.description"),
    ([{"role": "user", "content": "hi"}], {"seed": 18446744073709551616}, "seed"),
    ([{"role": "user", "content": "hi"}], {"response_format": {"type": "json_object"}}, "response_format"),
])
def test_hostile_chat_fields_get_400(server, messages, extra, param):
    r = post(server[0], "/v1/chat/completions", {"messages": messages, "max_tokens": 2, **extra})
    assert r.status_code == 400, r.text
    if param:
        assert r.json()["error"]["param"] == param


def test_edge_values_that_are_valid_are_served(server):
    url, _ = server
    top = post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 3, "seed": 2**63 - 1, "n": 2,
                                        "temperature": 1, "top_k": 10**30, "best_of": 2})
    assert top.status_code == 200, top.text
    again = post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 3, "seed": 2**63 - 1, "n": 2,
                                          "temperature": 1})
    assert [c["text"] for c in again.json()["choices"]] == [c["text"] for c in top.json()["choices"]]
    r = post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "h\u00e9 \U0001f600"}],
                                           "max_tokens": 2, "seed": 0, "presence_penalty": 0, "logit_bias": {}})
    assert r.status_code == 200, r.text


def test_nothing_left_running(server):
    url, srv = server
    wait_until(lambda: metric(url, "minicpm4_running_requests") == 0, "back to zero running requests")
    assert metric(url, "minicpm4_queue_length") == 0
    assert srv.engine._outstanding == 0
