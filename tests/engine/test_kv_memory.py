"""KV-cache memory follows what requests use (minicpm4/lazy_memory.py, engine/kv_budget.py): an engine sized for 16
slots x 32K tokens commits only the pages its requests wrote and gives them back when they end; the prefix cache
and InfLLM v2's compressed keys live in the same kind of buffer; admission waits for the KV budget, and a request
that can never fit it is refused by name."""

import sys

import pytest
import torch
from model_util import random_model

from minicpm4 import lazy_memory
from minicpm4.config import ModelConfig, tiny
from minicpm4.engine.engine import Engine
from minicpm4.engine.sampling import SamplingParams
from minicpm4.errors import InputError
from minicpm4.lazy_memory import committed_bytes, lazy_zeros, release

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not sys.platform.startswith("linux") or not lazy_memory.available(),
                                 reason="needs Linux's /proc/self/smaps and an overcommit policy that allows "
                                        "lazily committed mappings")]

SPARSE = dict(kernel_size=8, kernel_stride=4, block_size=16, window_size=16, init_blocks=1, topk=3, dense_len=64)
PAGE = lazy_memory.PAGE


def test_lazy_zeros_commit_on_write_and_release():
    t = lazy_zeros((64, 1024, 64), torch.float32)  # 16 MiB of address space, 256 KiB per [1024, 64] row
    assert committed_bytes([t]) == 0 and not t[5].any()
    t[3, :100] = 1.5  # 100 x 256 B: 7 pages
    assert committed_bytes([t]) == 7 * PAGE
    release(t[3])
    assert committed_bytes([t]) == 0 and not t[3].any()  # reads as zeros again
    t[:, :16] = 2.0  # one page in each of 64 rows; a strided view is released run by run
    release(t[:, :16])
    assert committed_bytes([t]) == 0


def kv_bytes(engine: Engine) -> int:
    c = engine._cache
    comp = c.compressed
    extra = [] if comp is None else [*comp.c, *([comp.k_nope] if comp.k_nope is not None else [])]
    return committed_bytes([c.k, c.v, *extra])


@pytest.mark.parametrize("sparse", [None, {**SPARSE, "use_nope": True}], ids=["dense", "sparse-nope"])
def test_engine_commits_what_requests_write_and_releases_it(sparse):
    cfg = ModelConfig.from_dict({**tiny().to_dict(), "max_position_embeddings": 32768, "sparse_config": sparse})
    model = random_model(cfg)
    engine = Engine(model, prefill_chunk=128, max_slots=16, max_len=32768)
    lengths = [300, 170, 90]
    g = torch.Generator().manual_seed(0)
    reqs = [engine.add_request(torch.randint(3, 512, (n,), generator=g).tolist(),
                                SamplingParams(max_new_tokens=40, ignore_eos=True)) for n in lengths]
    while engine.running < 3 or any(r.prefilled < len(r.prompt) for r in reqs):
        engine.step()
    c = engine._cache
    assert (c.batch_size, c.max_len) == (16, 32768)  # 16 x 32K slots of address space: 256 MiB of k and v
    reserved = 2 * c.k.numel() * c.k.element_size()
    # every [slots, head_dim] span of a written row commits the pages its tokens reach (64 B a token here)
    spans = cfg.num_hidden_layers * cfg.num_key_value_heads * (3 if cfg.sparse_config and sparse["use_nope"] else 2)
    per_token = cfg.head_dim * 4
    written = sum(spans * -(-(n + 1) * per_token // PAGE) * PAGE for n in lengths)
    mid = kv_bytes(engine)
    # sparse: + C1/C2, at most 3 pages per row, layer and head here
    assert written <= mid <= written + (0 if sparse is None else 3 * 12 * PAGE), (mid, written)
    assert mid < reserved / 200
    while engine.has_work:
        engine.step()
    assert kv_bytes(engine) == 0  # every row given back
    assert all(len(r.out.token_ids) == 40 for r in reqs)


def test_budget_makes_requests_wait_and_refuses_what_can_never_fit():
    model = random_model(tiny())
    per_token = 2 * 2 * 2 * 16 * 4  # k and v, 2 layers, 2 kv heads, head_dim 16, fp32
    engine = Engine(model, max_slots=4, kv_cache_gb=300 * per_token / 2**30)  # room for 300 tokens
    p = SamplingParams(max_new_tokens=50, ignore_eos=True)
    a, b = engine.add_request(list(range(3, 203)), p), engine.add_request(list(range(3, 103)), p)
    engine.step()
    assert a.slot >= 0 and b.slot < 0  # 250 reserved: b's 150 more wait
    while not a.finished:
        engine.step()
    engine.step()
    assert b.slot >= 0
    with pytest.raises(InputError, match="kv-cache-gb"):
        engine.add_request(list(range(3, 303)), p)  # 350 tokens: more than the whole budget
    while engine.has_work:
        engine.step()
    assert len(b.out.token_ids) == 50 and engine.kv_budget.used == 0


def test_parked_rows_keep_their_pages_until_the_budget_needs_them():
    """With the prefix cache a finished request's row stays committed for a next turn (engine/parked_rows.py),
    counted in the budget; an unrelated request that needs the room gets it by giving that row back."""
    model = random_model(tiny())
    per_token = 2 * 2 * 2 * 16 * 4
    engine = Engine(model, max_slots=4, prefix_cache_gb=0.01, kv_cache_gb=300 * per_token / 2**30)
    p = SamplingParams(max_new_tokens=50, ignore_eos=True)
    a = engine.generate([list(range(3, 203))], p)[0]
    assert a.finish_reason == "length" and len(engine.parked) == 1
    assert kv_bytes(engine) > 0 and engine.kv_budget.used == 250  # its prompt and 50 tokens' keys stay
    b = engine.add_request(list(range(300, 400)), p)  # 150 more do not fit beside the parked 250
    engine.step()
    assert b.slot >= 0 and len(engine.parked) == 0 and engine.kv_budget.used == 150
    while engine.has_work:
        engine.step()
    assert len(engine.parked) == 1 and engine.kv_budget.used == 150
