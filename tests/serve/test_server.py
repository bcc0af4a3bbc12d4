"""The OpenAI-compatible server, driven by the real `openai` client (and raw HTTP for bad input)."""

import asyncio
import json
import time

import httpx2 as httpx  # the HTTP client the openai package is built on here
import openai
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from chat_questions import QUESTIONS
from server_util import running_server

from minicpm4.engine.sampling import SamplingParams
from minicpm4.serve.llm import LLM


def served(model_tok, **engine):
    """A fresh LLM (own engine) over the shared weights: each server's engine thread owns its engine."""
    return LLM(*model_tok, max_len=1024, **{"max_slots": 16, **engine})


@pytest.fixture(scope="module")
def llm(model_tok):
    return served(model_tok)


@pytest.fixture(scope="module")
def server(llm):
    with running_server(llm, max_tokens=64, tool_format="json") as (url, srv):
        yield url, srv


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def ref(model_tok):
    """Same model, its own engine, for expected outputs."""
    return served(model_tok)


def alone(llm, question, n=10):
    return llm.chat([{"role": "user", "content": question}], SamplingParams(max_new_tokens=n)).text


def test_models_health_and_metrics(client, server):
    assert [m.id for m in client.models.list().data] == ["test-model"]
    assert httpx.get(server[0] + "/health").json()["status"] == "ok"
    text = httpx.get(server[0] + "/metrics").text
    for name in ("minicpm4_queue_length", "minicpm4_generated_tokens_total", "minicpm4_time_to_first_token_seconds_count"):
        assert name in text


def test_chat_whole_and_streamed_equal_the_library(client, ref):
    llm = ref
    msgs = [{"role": "user", "content": QUESTIONS[0]}]
    r = client.chat.completions.create(model="test-model", messages=msgs, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == alone(llm, QUESTIONS[0])
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 10
    assert r.usage.prompt_tokens == len(llm.encode_chat(msgs))
    chunks = list(client.chat.completions.create(model="test-model", messages=msgs, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10


def test_completions_stop_logprobs_and_seeded_n(client, ref):
    llm = ref
    prompt = "The capital of France is"
    r = client.completions.create(model="test-model", prompt=prompt, max_tokens=8, temperature=0, logprobs=3)
    want = llm.generate(prompt, SamplingParams(max_new_tokens=8))[0].text
    assert r.choices[0].text == want
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == 8 and all(v <= 0 for v in lp.token_logprobs)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):  # greedy: the chosen token is the top one
        assert len(top) == 3 and max(top.values()) == pytest.approx(chosen)
    word = want.split()[1] if len(want.split()) > 1 else want.strip()
    cut = client.completions.create(model="test-model", prompt=prompt, max_tokens=8, temperature=0, stop=[word])
    assert cut.choices[0].text == want[:want.index(word)] and cut.choices[0].finish_reason == "stop"
    a, b = (client.chat.completions.create(model="test-model", messages=[{"role": "user", "content": "Tell a story."}],
                                           max_tokens=12, temperature=1.0, seed=7, n=2) for _ in range(2))
    texts = [c.message.content for c in a.choices]
    assert texts == [c.message.content for c in b.choices] and texts[0] != texts[1]


def test_sixteen_concurrent_streams_equal_one_at_a_time(server, ref):
    llm = ref
    expected = [alone(llm, q) for q in QUESTIONS]
    client = openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)

    async def one(q):
        stream = await client.chat.completions.create(model="test-model", messages=[{"role": "user", "content": q}],
                                                      max_tokens=10, temperature=0, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream])

    async def all_at_once():
        return await asyncio.gather(*(one(q) for q in QUESTIONS))
    t0 = time.perf_counter()
    got = asyncio.run(all_at_once())
    print(f"16 streams x 10 tokens in {time.perf_counter() - t0:.1f}s")
    assert got == expected


def test_disconnecting_client_frees_its_slot(server):
    url, srv = server
    before = srv.engine.metrics.requests.get("cancelled", 0)
    body = {"model": "m", "messages": [{"role": "user", "content": "Count to a thousand."}], "max_tokens": 64,
            "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        # the role chunk may come before the engine thread admits the request: wait for the first token's chunk
        first = next(line for line in lines if '"content": "' in line and '"content": ""' not in line)
        assert first.startswith("data: ")
        assert srv.engine.running == 1
    deadline = time.time() + 10
    while srv.engine.running and time.time() < deadline:
        time.sleep(0.05)
    assert srv.engine.running == 0 and srv.engine.metrics.requests.get("cancelled", 0) == before + 1


@pytest.mark.parametrize("body, status, param", [
    (b'{"messages": [', 400, None),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, 400, None),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "word " * 3000}]}, 400, None),
    ({"prompt": "hi", "n": 0}, 400, "n"),
])
def test_bad_requests_get_openai_style_400(server, body, status, param):
    path = "/v1/completions" if isinstance(body, dict) and "prompt" in body else "/v1/chat/completions"
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server[0] + path, headers={"content-type": "application/json"}, timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    if param:
        assert err["param"] == param


def test_body_size_and_unknown_route(server):
    r = httpx.post(server[0] + "/v1/chat/completions", content=b"x" * (2 << 20), timeout=30)
    assert r.status_code == 413 and "error" in r.json()
    assert httpx.get(server[0] + "/v1/nothing").status_code == 404


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                           max_leaves=8)
fields = st.sampled_from(["messages", "model", "max_tokens", "temperature", "top_p", "n", "stop", "stream", "seed",
                          "logprobs", "top_logprobs", "tools", "tool_choice", "prompt", "stream_options",
                          "stop_token_ids", "ignore_eos", "return_token_ids", "seed_offset"])
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]),
                                 "content": st.text(max_size=20) | json_values})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.dictionaries(fields, json_values, max_size=5), msgs=st.lists(message, max_size=2),
       path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_fuzzed_requests_never_500(fuzz_server, body, msgs, path):
    if msgs and "messages" not in body:
        body["messages"] = msgs
    r = httpx.post(fuzz_server + path, content=json.dumps(body), headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code in (200, 400, 422, 429), (r.status_code, r.text)
    assert r.status_code != 422  # validation errors are reported as 400, the OpenAI way


@pytest.fixture(scope="module")
def fuzz_server(model_tok):
    with running_server(served(model_tok), max_tokens=2, tool_format="json") as (url, _):  # valid requests finish fast
        yield url


def test_api_key_is_enforced(model_tok):
    with running_server(served(model_tok), api_key="s3cret", tool_format="json") as (url, _):
        bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        assert httpx.get(url + "/v1/models").status_code == 401
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert good.models.list().data[0].id == "test-model"
        assert httpx.get(url + "/health").status_code == 200  # liveness needs no key


def test_full_queue_answers_429(model_tok):
    with running_server(served(model_tok, max_slots=1), max_queue=0, tool_format="json") as (url, srv):
        body = {"model": "m", "messages": [{"role": "user", "content": "Count to a thousand."}], "max_tokens": 40,
                "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
            next(r.iter_lines())
            second = httpx.post(url + "/v1/chat/completions", json={**body, "stream": False}, timeout=30)
        assert second.status_code == 429 and second.json()["error"]["type"] == "rate_limit_error"


def test_engine_failure_fails_its_requests_and_the_engine_keeps_serving(model_tok):
    from minicpm4.engine.async_engine import AsyncEngine
    llm = served(model_tok)
    eng = AsyncEngine(llm.engine)
    prompt = llm.encode_chat([{"role": "user", "content": "Hi"}])
    params = SamplingParams(max_new_tokens=4, stop_token_ids=llm.stop_token_ids)

    def broken_stop_fn(ids):
        raise ZeroDivisionError("a bug in a stop function")

    async def run():
        bad = eng.submit(prompt, params, broken_stop_fn)
        with pytest.raises(RuntimeError, match="engine failure: ZeroDivisionError"):
            [t async for t in bad]
        good = eng.submit(prompt, params)
        return [t async for t in good]
    try:
        tokens = asyncio.run(run())
    finally:
        eng.shutdown()
    assert tokens == alone_ids(served(model_tok), prompt, params)
    assert eng.queued == 0 and eng.running == 0


def alone_ids(llm, prompt, params):
    return llm.engine.generate([prompt], params)[0].token_ids
