"""The server with the engine's prefix cache, through the real openai client: a conversation over a document
gets the same answers as without the cache, `usage.prompt_tokens_details.cached_tokens` says how many prompt
tokens each turn reused, /metrics reports the hit rate, and a prompt past the context is a 400."""

import re

import httpx2 as httpx
import openai
import pytest
from server_util import running_server

from minicpm4.engine.sampling import SamplingParams
from minicpm4.serve.llm import LLM

CHUNK = 64


@pytest.fixture(scope="module")
def server(model_tok):
    llm = LLM(*model_tok, max_len=1024, prefill_chunk=CHUNK, prefix_cache_gb=0.05)
    with running_server(llm, max_tokens=64) as (url, srv):
        yield url, srv


def metric(text: str, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def test_conversation_reuses_its_prefix_and_reports_cached_tokens(server, model_tok, real_text):
    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    reference = LLM(*model_tok, max_len=1024, prefill_chunk=CHUNK)  # no prefix cache
    doc = real_text[:1500]
    messages = [{"role": "system", "content": "Answer from this text:\n" + doc},
                {"role": "user", "content": "What is this text about?"}]
    prompts = cached = 0
    for turn, question in enumerate(["Who wrote it?", "Summarise it in five words.", None]):
        r = client.chat.completions.create(model="test-model", messages=messages, temperature=0, max_tokens=12)
        answer = r.choices[0].message.content
        want = reference.chat(messages, SamplingParams(max_new_tokens=12)).text
        assert answer == want
        got = r.usage.prompt_tokens_details.cached_tokens
        # the previous turn's prompt is a prefix of this one, ending with the reply opening: all of it is reused
        assert got == (0 if turn == 0 else previous)
        prompts, cached, previous = prompts + r.usage.prompt_tokens, cached + got, r.usage.prompt_tokens
        if question:
            messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": question}]
    assert cached > 0
    # streamed, the usage chunk says the same: the prompt is the last turn's again, all of it but its last chunk
    stream = client.chat.completions.create(model="test-model", messages=messages, temperature=0, max_tokens=4,
                                            stream=True, stream_options={"include_usage": True})
    usage = [c.usage for c in stream if c.usage is not None][0]
    ends = reference.engine.chunk_ends(reference.encode_chat(messages))  # chunked as the server chunks it
    assert ends[-1] == previous and usage.prompt_tokens_details.cached_tokens == ends[-2]
    prompts, cached = prompts + usage.prompt_tokens, cached + usage.prompt_tokens_details.cached_tokens
    text = httpx.get(url + "/metrics").text
    assert metric(text, "minicpm4_prompt_tokens_total") == prompts
    assert metric(text, "minicpm4_prompt_cached_tokens_total") == cached
    assert metric(text, "minicpm4_prefix_cache_hit_rate") == pytest.approx(cached / prompts, abs=1e-4)
    assert metric(text, "minicpm4_prefix_cache_blocks") > 0


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": [5] * 1024, "max_tokens": 1}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 1500}], "max_tokens": 1}),
])
def test_prompt_past_the_context_is_a_400(server, path, body):
    r = httpx.post(server[0] + path, json={"model": "test-model", **body}, timeout=30)
    assert r.status_code == 400, r.text
    assert "does not fit the context of 1024 tokens" in r.json()["error"]["message"]
