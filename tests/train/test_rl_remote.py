"""Chunk-wise rollout through a running server (train/rl/remote.py) against the in-process rollout, on the real
default model: same seeds and unchanged weights give the same samples, chunk bookkeeping and log-probs; publishing
weights reloads the server and tags the chunks with the version it reports."""

import pytest
import torch
from server_util import running_server

import minicpm4
from minicpm4.engine.engine import Engine
from minicpm4.errors import ConfigError
from minicpm4.serve.llm import LLM
from minicpm4.train.checkpoint import write_model_dir
from minicpm4.train.rl.remote import RemoteBackend
from minicpm4.train.rl.rollout import ChunkRollout, RolloutSettings

pytestmark = pytest.mark.usefixtures("one_thread")

CTX = 256
SETTINGS = RolloutSettings(group_size=2, chunk_tokens=4, max_len=12, seed=5)  # stop ids: the model's eos


@pytest.fixture(scope="module")
def model_tok(smollm_gguf):
    return minicpm4.load(smollm_gguf, dtype="fp32")


@pytest.fixture(scope="module")
def prompts(model_tok):
    tok = model_tok[1]
    return [("a", tok.encode("The capital of France is")), ("b", tok.encode("Once upon a time"))]


@pytest.fixture(scope="module")
def server(model_tok):
    with running_server(LLM(*model_tok, max_len=CTX, max_slots=8), admin_key="adm", max_tokens=64) as (url, srv):
        yield url, srv


def remote(url, config, tmp_path, admin_key="adm"):
    return RemoteBackend([url], config.vocab_size, CTX, config.eos_token_ids, tmp_path / "weights",
                         admin_key=admin_key)


def run_rounds(ro, prompts, version=0):
    groups = []
    for i in range(3):  # 12 tokens in chunks of 4
        groups += ro.round(prompts if i == 0 else [], version)
    assert ro.buffer == [] and ro.finished == {}
    return groups


@pytest.fixture(scope="module")
def in_process(model_tok, prompts):
    ro = ChunkRollout(Engine(model_tok[0], max_len=CTX, max_slots=8), SETTINGS)
    return ro, run_rounds(ro, prompts)


def test_remote_rollout_equals_the_in_process_rollout(server, model_tok, prompts, in_process, tmp_path):
    local, want = in_process
    ro = ChunkRollout(remote(server[0], model_tok[0].config, tmp_path), SETTINGS)
    got = run_rounds(ro, prompts, version=99)  # the server's version (0) tags the chunks, not the round's
    assert [g.key for g in got] == [g.key for g in want] == ["a", "b"]
    for gw, gg in zip(want, got):
        for sw, sg in zip(gw.samples, gg.samples, strict=True):
            assert sg.tokens == sw.tokens and sg.finish_reason == sw.finish_reason and sg.versions == sw.versions
            assert sg.chunks() == sw.chunks() and sg.chunks()[0][0] == 0
            torch.testing.assert_close(torch.tensor(sg.logprobs), torch.tensor(sw.logprobs), atol=1e-5, rtol=0)
    # the same rounds: samples resumed across chunks (prompt + generated re-sent), finishing in the same round
    assert [(h.requests, h.resumed, h.prefill_tokens, h.tokens, h.finished) for h in ro.history] == \
        [(h.requests, h.resumed, h.prefill_tokens, h.tokens, h.finished) for h in local.history]
    assert len(ro.history) == 3 and ro.history[1].resumed > 0 and ro.history[2].resumed > 0
    # the group's samples differ (a seed per sample)
    assert got[0].samples[0].tokens != got[0].samples[1].tokens
    assert all(h.steps == 0 and h.slots == 0 for h in ro.history)  # a server's slots are not observable


def test_publish_reloads_the_server_and_tags_chunks_with_its_version(server, model_tok, prompts, in_process,
                                                                    tmp_path):
    model, tok = model_tok
    url, srv = server
    backend = remote(url, model.config, tmp_path)
    writes = []

    def write(d):
        writes.append(d)
        write_model_dir(d, model.config, model.state_dict(), tok)
    backend.publish(3, write)
    backend.publish(3, write)  # already served: no second write or reload
    assert srv.weights.version == 3 and backend.version == 3 and len(writes) == 1
    ro = ChunkRollout(backend, SETTINGS)
    got = run_rounds(ro, prompts, version=0)
    for gw, gg in zip(in_process[1], got):  # the same weights, reloaded from the written checkpoint
        for sw, sg in zip(gw.samples, gg.samples, strict=True):
            assert sg.tokens == sw.tokens and set(sg.versions) == {3}
            torch.testing.assert_close(torch.tensor(sg.logprobs), torch.tensor(sw.logprobs), atol=1e-5, rtol=0)
    backend.publish(4, write)
    assert srv.weights.version == 4 and not writes[0].exists() and writes[1].is_dir()  # the old copy is removed
    with pytest.raises(ConfigError, match="refused the weight reload"):
        remote(url, model.config, tmp_path / "x", admin_key="wrong").publish(5, write)
    assert srv.weights.version == 4
