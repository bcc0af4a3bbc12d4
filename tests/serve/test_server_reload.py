"""What a trainer needs from the server, on the real default model: token-id prompts in, token ids and log-probs out
(equal to the in-process engine's), seed_offset continuing a sample's random stream, and the authenticated weight
reload (POST /update_weights_from_disk): keys, the swap, the version, bad paths, draining running requests."""

import shutil
import threading
import time

import httpx2 as httpx  # the HTTP client the openai package is built on here
import pytest
import torch
from model_util import random_model
from server_util import running_server

import minicpm4
from minicpm4.config import tiny
from minicpm4.engine.engine import Engine
from minicpm4.engine.sampling import SamplingParams
from minicpm4.serve.llm import LLM
from minicpm4.train.checkpoint import write_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")

CTX = 256
PROMPT_TEXT = "The capital of France is"


@pytest.fixture(scope="module")
def model_tok(smollm_gguf):
    model, tok = minicpm4.load(smollm_gguf, dtype="fp32")  # fp32: batched decode equals one-at-a-time exactly
    return model, tok


@pytest.fixture(scope="module")
def other_dir(model_tok, tmp_path_factory):
    """A checkpoint of the same architecture with other weights (the final norm rescaled per channel)."""
    model, tok = model_tok
    g = torch.Generator().manual_seed(0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    w = state["model.norm.weight"]
    state["model.norm.weight"] = w * (1 + 0.5 * torch.randn(w.shape, generator=g))
    path = tmp_path_factory.mktemp("other") / "model"
    write_model_dir(path, model.config, state, tok)
    return path


def served(model_tok) -> LLM:
    return LLM(*model_tok, max_len=CTX, max_slots=8)  # its own engine over the shared weights


def greedy_ids(model, prompt, n=8, stop=None):
    params = SamplingParams(max_new_tokens=n, temperature=0.0, logprobs=0, stop_token_ids=stop)
    return Engine(model, max_len=CTX, max_slots=8).generate([prompt], params)[0]


def complete(url, key=None, **body):
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(url + "/v1/completions", json={"model": "m", **body}, headers=headers, timeout=60)


def reload(url, key=None, **body):
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(url + "/update_weights_from_disk", json=body, headers=headers, timeout=60)


def ids_of(r) -> list[int]:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


@pytest.fixture(scope="module")
def server(model_tok):
    with running_server(served(model_tok), max_tokens=64) as (url, srv):
        yield url, srv


def test_token_id_prompt_returns_the_engines_ids_and_logprobs(server, model_tok):
    url, srv = server
    model, tok = model_tok
    prompt = tok.encode(PROMPT_TEXT)
    want = greedy_ids(model, prompt, stop=srv.llm.stop_token_ids)
    r = complete(url, prompt=prompt, max_tokens=8, temperature=0, logprobs=0, return_token_ids=True)
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    assert choice["prompt_token_ids"] == prompt and choice["token_ids"] == want.token_ids
    assert choice["logprobs"]["token_logprobs"] == pytest.approx([lp for lp, _ in want.logprobs], abs=1e-5)
    assert body["weight_version"] == 0 and choice["text"] == tok.decode(want.token_ids)
    # the same prompt as text gives the same ids; without return_token_ids no ids are sent
    r = complete(url, prompt=PROMPT_TEXT, max_tokens=8, temperature=0)
    assert r.status_code == 200 and "token_ids" not in r.json()["choices"][0]


def test_seed_offset_continues_the_samples_stream(server, model_tok):
    """A sample split over two requests (the second told how many tokens the seed has already drawn) samples what
    one request samples, with the same log-probs: what chunk-wise rollout through a server relies on."""
    url, _ = server
    prompt = model_tok[1].encode("Once upon a time")
    common = {"temperature": 1.0, "top_p": 1.0, "seed": 1234, "logprobs": 0, "return_token_ids": True,
              "ignore_eos": True, "stop_token_ids": []}
    whole = complete(url, prompt=prompt, max_tokens=10, **common).json()["choices"][0]
    first = complete(url, prompt=prompt, max_tokens=4, **common).json()["choices"][0]
    rest = complete(url, prompt=prompt + first["token_ids"], max_tokens=6, seed_offset=4, **common).json()["choices"][0]
    assert len(whole["token_ids"]) == 10 and whole["finish_reason"] == "length"
    assert first["token_ids"] + rest["token_ids"] == whole["token_ids"]
    got = first["logprobs"]["token_logprobs"] + rest["logprobs"]["token_logprobs"]
    assert got == pytest.approx(whole["logprobs"]["token_logprobs"], abs=1e-5)
    # without the offset the stream restarts: the continuation draws differently
    again = complete(url, prompt=prompt + first["token_ids"], max_tokens=6, **common).json()["choices"][0]
    assert again["token_ids"] != rest["token_ids"]


def test_stop_token_ids_and_ignore_eos(server, model_tok):
    url, _ = server
    prompt = model_tok[1].encode(PROMPT_TEXT)
    free = ids_of(complete(url, prompt=prompt, max_tokens=8, temperature=0, return_token_ids=True, ignore_eos=True))
    stop = free[3]
    k = free.index(stop)
    r = complete(url, prompt=prompt, max_tokens=8, temperature=0, return_token_ids=True, ignore_eos=True,
                 stop_token_ids=[stop])
    assert ids_of(r) == free[:k + 1] and r.json()["choices"][0]["finish_reason"] == "stop"  # kept as the last id


@pytest.mark.parametrize("body, field", [
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [49152]}, "prompt"),  # the vocabulary has 49152 ids
    ({"prompt": [5, -1]}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [True, 2]}, "prompt"),  # not coerced to 1
    ({"prompt": ["12", 3]}, "prompt"),
    ({"prompt": [1.5]}, "prompt"),
    ({"prompt": [[1], [2]]}, "prompt"),
    ({"prompt": [1, 2], "seed_offset": 3}, "seed_offset"),  # without a seed
    ({"prompt": [1, 2], "seed": 1, "seed_offset": -1}, "seed_offset"),
    ({"prompt": [1, 2], "stop_token_ids": [10**6]}, "stop_token_ids"),
    ({"prompt": [1, 2], "return_token_ids": "maybe"}, "return_token_ids"),
])
def test_bad_token_id_requests_get_400_naming_the_field(server, body, field):
    r = complete(server[0], **body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == field or err["message"].startswith(field + ":"), err


def test_reload_needs_the_admin_key(model_tok, other_dir):
    path = str(other_dir)
    with running_server(served(model_tok)) as (url, srv):  # no key at all: reloads are refused, not open
        r = reload(url, model_path=path)
        assert r.status_code == 403 and r.json()["error"]["code"] == "reload_disabled"
        assert reload(url, "anything", model_path=path).status_code == 403
        assert srv.weights.version == 0 and srv.llm.model is model_tok[0]
    with running_server(served(model_tok), api_key="k", admin_key="adm") as (url, srv):
        for key in (None, "k", "wrong"):  # the API key is not the admin key
            r = reload(url, key, model_path=path)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert srv.weights.version == 0 and srv.llm.model is model_tok[0]
        assert reload(url, "adm", model_path=path).json() == {"success": True, "message": f"serving {path}",
                                                              "weight_version": 1}
    with running_server(served(model_tok), api_key="k") as (url, srv):  # no admin key: the API key may reload
        assert reload(url, "k", model_path=path, weight_version=41).json()["weight_version"] == 41


def test_reload_serves_the_new_checkpoint_and_bumps_the_version(model_tok, other_dir):
    model, tok = model_tok
    prompt = tok.encode(PROMPT_TEXT)
    other, _ = minicpm4.load(other_dir, dtype="fp32")
    with running_server(served(model_tok), admin_key="adm") as (url, srv):
        stop = srv.llm.stop_token_ids
        old, new = greedy_ids(model, prompt, stop=stop).token_ids, greedy_ids(other, prompt, stop=stop).token_ids
        assert old != new  # the two checkpoints answer differently
        ask = dict(prompt=prompt, max_tokens=8, temperature=0, return_token_ids=True)
        r = complete(url, **ask)
        assert ids_of(r) == old and r.json()["weight_version"] == 0
        assert reload(url, "adm", model_path=str(other_dir)).json()["weight_version"] == 1
        r = complete(url, **ask)
        assert ids_of(r) == new and r.json()["weight_version"] == 1
        assert httpx.get(url + "/health").json()["weight_version"] == 1
        assert reload(url, "adm", model_path=str(other_dir), weight_version=7).json()["weight_version"] == 7
        assert complete(url, **ask).json()["weight_version"] == 7


def test_bad_reload_gets_400_and_the_old_weights_keep_serving(model_tok, tmp_path):
    model, tok = model_tok
    prompt = tok.encode(PROMPT_TEXT)
    write_model_dir(tmp_path / "tiny", tiny(), random_model(tiny()).state_dict(), tok)  # another architecture
    (tmp_path / "empty").mkdir()
    (tmp_path / "pickle").mkdir()
    shutil.copy(tmp_path / "tiny" / "config.json", tmp_path / "pickle")
    torch.save({}, tmp_path / "pickle" / "pytorch_model.bin")  # a pickle is never unpickled
    with running_server(served(model_tok), admin_key="adm") as (url, srv):
        ask = dict(prompt=prompt, max_tokens=8, temperature=0, return_token_ids=True)
        before = ids_of(complete(url, **ask))
        for path, says in ((tmp_path / "missing", "no such file"), (tmp_path / "empty", "config.json"),
                           (tmp_path / "pickle", "pytorch_model.bin"), (tmp_path / "tiny", "config differs")):
            r = reload(url, "adm", model_path=str(path))
            assert r.status_code == 400, r.text
            msg = r.json()["error"]["message"]
            assert msg.startswith(f"model_path: {path}") and says in msg, msg
        r = reload(url, "adm")
        assert r.status_code == 400 and r.json()["error"]["param"] == "model_path"
        r = reload(url, "adm", model_path=str(tmp_path / "tiny"), weight_version=-2)
        assert r.status_code == 400 and r.json()["error"]["param"] == "weight_version"
        assert srv.weights.version == 0 and srv.llm.model is model
        r = complete(url, **ask)
        assert ids_of(r) == before and r.json()["weight_version"] == 0


def test_running_requests_finish_on_the_old_weights(model_tok, other_dir):
    """A reload waits for the requests already running (drained, not aborted); requests that arrive during the
    swap wait for the new weights."""
    model, tok = model_tok
    prompt = tok.encode("Write a long story about a dragon.")
    with running_server(served(model_tok), admin_key="adm") as (url, srv):
        want = greedy_ids(model, prompt, n=24, stop=[]).token_ids
        out = {}
        ask = dict(prompt=prompt, max_tokens=24, temperature=0, return_token_ids=True, ignore_eos=True)

        def run():
            out["r"] = complete(url, **ask)
            out["done"] = time.perf_counter()
        t = threading.Thread(target=run)
        t.start()
        deadline = time.time() + 30
        while srv.engine.running == 0 and time.time() < deadline:
            time.sleep(0.01)
        assert srv.engine.running == 1
        r = reload(url, "adm", model_path=str(other_dir))
        reloaded = time.perf_counter()
        t.join()
        assert r.json()["weight_version"] == 1 and out["done"] <= reloaded  # the reload waited for the request
        running = out["r"].json()
        assert running["weight_version"] == 0 and running["choices"][0]["token_ids"] == want
        assert complete(url, **{**ask, "max_tokens": 1}).json()["weight_version"] == 1
