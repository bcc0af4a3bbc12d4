"""The engine's prefix cache (minicpm4/engine/prefix_cache.py): a request served from cached blocks gives exactly
the tokens it gives without them (greedy), on dense and InfLLM v2 sparse tiny models (Python layers and the C++
stack) and on the default model's int4 and bf16 paths; eviction under a tiny budget while requests run; a
request cancelled mid-prefill leaves only whole, correct blocks; cached_tokens counts what was not prefilled."""

import pytest
import torch
from model_util import random_model

from minicpm4.config import ModelConfig, tiny
from minicpm4.engine.engine import Engine
from minicpm4.engine.prefix_cache import chain_keys
from minicpm4.engine.sampling import SamplingParams
from minicpm4.model.native_stack import attach
from minicpm4.serve.llm import LLM

pytestmark = pytest.mark.usefixtures("one_thread")

CHUNK = 32
GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)
# InfLLM v2 past 64 keys, a few 16-key blocks selected out of many: far from dense attention
SPARSE = dict(kernel_size=8, kernel_stride=4, block_size=16, window_size=16, init_blocks=1, topk=3, dense_len=64)


def tiny_model(sparse: dict | None, dtype: torch.dtype, seed: int = 0):
    cfg = ModelConfig.from_dict({**tiny().to_dict(), "sparse_config": sparse})
    return attach(random_model(cfg, seed).to(dtype))


def prompts_sharing_a_prefix(seed: int = 0) -> list[list[int]]:
    """The same 150 tokens twice, and prompts leaving them mid-block (170 and 100: not multiples of CHUNK)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(3, 512, (200,), generator=g).tolist()
    return [base[:150], base[:170] + [5, 6, 7] * 10, base[:100] + torch.randint(3, 512, (90,), generator=g).tolist(),
            base[:150]]


def one_by_one(engine: Engine, prompts, params=GREEDY):
    return [engine.generate([p], params)[0] for p in prompts]


def block_bytes(model) -> int:
    c = model.config
    return 2 * c.num_hidden_layers * c.num_key_value_heads * CHUNK * c.head_dim * next(model.parameters()).element_size()


@pytest.mark.parametrize("sparse, dtype", [(None, torch.float32), (None, torch.bfloat16), (SPARSE, torch.float32),
                                           (SPARSE, torch.bfloat16), ({**SPARSE, "use_nope": True}, torch.float32)],
                         ids=["dense-fp32", "dense-bf16-native", "sparse-fp32", "sparse-bf16-native", "sparse-nope"])
def test_cached_requests_equal_uncached(sparse, dtype):
    model = tiny_model(sparse, dtype)
    if dtype == torch.bfloat16 and model.native is None:
        pytest.skip("the C++ decode stack did not build here (no compiler, or no bf16 kernels for this CPU)")
    prompts = prompts_sharing_a_prefix()
    want = [g.token_ids for g in one_by_one(Engine(model, prefill_chunk=CHUNK), prompts)]
    engine = Engine(model, prefill_chunk=CHUNK, prefix_cache_gb=0.01)
    got = one_by_one(engine, prompts)
    assert [g.token_ids for g in got] == want
    # cached chunks the prompt starts with: none yet; the first prompt's first 4 (128 of its 150 tokens: its
    # fifth chunk [128, 150) is not one of the second prompt's, [128, 160)); 3 (the third prompt leaves the
    # others mid-chunk, at 100); 4 (a prompt's last chunk is always prefilled: it gives the first token's logits)
    assert [g.cached_tokens for g in got] == [0, 128, 96, 128]
    assert len(engine.prefix_cache) == 5 + 3 + 3  # every chunk computed: 150 -> 5, 200 -> 3 more, 190 -> 3 more


def test_concurrent_requests_with_the_cache_equal_uncached():
    """Requests admitted together and prefilled beside each other (continuous batching, chunked prefill),
    some finding blocks another stored a step earlier."""
    model = tiny_model(SPARSE, torch.float32)
    prompts = prompts_sharing_a_prefix(1) * 2
    want = [g.token_ids for g in one_by_one(Engine(model, prefill_chunk=CHUNK), prompts)]
    engine = Engine(model, prefill_chunk=CHUNK, max_slots=3, prefix_cache_gb=0.01)
    got = engine.generate(prompts, GREEDY)
    assert [g.token_ids for g in got] == want
    assert sum(g.cached_tokens for g in got) > 0


@pytest.mark.parametrize("kind", ["int4", "bf16"])
def test_default_model_cached_equals_uncached(kind, smollm_gguf, real_text):
    """The default model as `serve` loads it (int4 layers, C++ stack) and with bf16 weights: a 3-turn chat
    over a document, chunked as LLM chunks it (right after the reply opening, before long chunks' control
    tokens), each turn served from the blocks of the turns before: all of the previous prompt."""
    llm = LLM.load(smollm_gguf, dtype="auto", int4=True) if kind == "int4" else LLM.load(smollm_gguf, dtype="bf16")
    doc = llm.tokenizer.decode(llm.tokenizer.encode(real_text)[:150])
    history, prompts = [{"role": "user", "content": doc + "\nWhat is this text about?"}], []
    chunking = dict(prefill_chunk=64, boundary_ids=llm.tokenizer.special_ids, reply_ids=llm.reply_opening())
    reference = Engine(llm.model, **chunking)
    for question in ("Who wrote it?", "Summarise it in five words."):
        prompts.append(llm.encode_chat(history))
        reply = reference.generate([prompts[-1]], GREEDY)[0].token_ids
        history += [{"role": "assistant", "content": llm.tokenizer.decode(reply, skip_special_tokens=True)},
                    {"role": "user", "content": question}]
    prompts.append(llm.encode_chat(history))
    want = [g.token_ids for g in one_by_one(reference, prompts)]
    got = one_by_one(Engine(llm.model, prefix_cache_gb=0.1, **chunking), prompts)
    assert [g.token_ids for g in got] == want
    assert got[0].cached_tokens == 0
    assert chunking["reply_ids"] == llm.tokenizer.encode("<|im_start|>assistant\n")  # 4 tokens
    for prev, g, new in zip(prompts, got[1:], prompts[1:]):
        assert new[:len(prev)] == prev
        # reused: all of the previous prompt; prefilled: the reply, the next question and the template around them
        assert g.cached_tokens == len(prev)


def test_chunks_end_after_the_reply_opening_and_turns_reuse_all_of_the_last():
    """Chat-shaped prompts of a tiny model: token 1 opens a turn (a boundary) and [1, 9] opens a reply. A chunk
    ends right after each reply opening and before a boundary once it holds CHUNK / 4 = 8 tokens; the next
    turn's prompt, which extends this one, reuses all of it."""
    model = tiny_model(SPARSE, torch.float32)
    g = torch.Generator().manual_seed(4)

    def words(n):
        return torch.randint(3, 512, (n,), generator=g).tolist()
    turn1 = [1, *words(70), 1, *words(20), 1, 9]  # system, user, and the opening of the reply
    turn2 = turn1 + words(15) + [1, *words(10), 1, 9]
    turn3 = turn2 + words(12) + [1, *words(40), 1, 9]
    chunking = dict(prefill_chunk=CHUNK, boundary_ids=[1], reply_ids=[1, 9])
    # [64, 71) is under 8 tokens: no end at the boundary at 71; [64, 92) is not; the reply opening [92, 94)
    assert Engine(model, **chunking).chunk_ends(turn1) == [32, 64, 92, 94]
    # turn 2 past turn 1's end: 15 words (a chunk of 8+, so it ends at the boundary after it), a boundary token
    # and 10 words (11 tokens: ends at the next boundary), the reply opening
    assert Engine(model, **chunking).chunk_ends(turn2) == [32, 64, 92, 94, 109, 120, 122]
    want = [x.token_ids for x in one_by_one(Engine(model, **chunking), [turn1, turn2, turn3])]
    engine = Engine(model, prefix_cache_gb=0.01, **chunking)
    got = one_by_one(engine, [turn1, turn2, turn3])
    assert [x.token_ids for x in got] == want
    assert [x.cached_tokens for x in got] == [0, len(turn1), len(turn2)]


def test_eviction_under_a_tiny_budget_while_requests_run():
    model = tiny_model(None, torch.float32)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 512, (100,), generator=g).tolist() for _ in range(3)]  # 4 chunks each
    want = [x.token_ids for x in one_by_one(Engine(model, prefill_chunk=CHUNK), prompts + prompts)]
    budget = 2.5 * block_bytes(model)
    engine = Engine(model, prefill_chunk=CHUNK, max_slots=3, prefix_cache_gb=budget / 2**30)
    reqs = [engine.add_request(p, GREEDY) for p in prompts]
    while not all(r.finished for r in reqs):
        engine.step()
        assert engine.prefix_cache.nbytes <= budget and len(engine.prefix_cache) <= 2
    assert engine.prefix_cache.evicted > 0
    again = one_by_one(engine, prompts)
    assert [r.out.token_ids for r in reqs] + [x.token_ids for x in again] == want
    # leaves go first: what survives the last prompt's run in the pool is its chain's head, its first 2 blocks
    ends = engine.chunk_ends(prompts[-1])
    assert [b.start for b in engine.prefix_cache.match(prompts[-1], chain_keys(prompts[-1], ends), ends)] == [0, CHUNK]
    # the row it ran in is parked with all its chunks: a request for it uses them in place, all but the last
    last = engine.generate([prompts[-1]], GREEDY)[0]
    assert last.cached_tokens == 3 * CHUNK and last.token_ids == want[-1]


def test_parked_rows_serve_the_next_turn_in_place_and_go_to_unrelated_prompts_clean():
    """A finished request's row keeps its keys (engine/parked_rows.py): the next turn uses them in place even
    when the pool holds nothing (a budget below one block), exactly; a prompt sharing nothing takes the row
    (the only slot), which is given back first, and gets what it gets on a fresh engine."""
    model = tiny_model(SPARSE, torch.float32)
    g = torch.Generator().manual_seed(5)
    turn1 = torch.randint(3, 512, (90,), generator=g).tolist()
    turn2 = turn1 + torch.randint(3, 512, (40,), generator=g).tolist()
    other = torch.randint(3, 512, (70,), generator=g).tolist()
    want = [x.token_ids for x in one_by_one(Engine(model, prefill_chunk=CHUNK), [turn1, turn2, other, turn2])]
    engine = Engine(model, prefill_chunk=CHUNK, max_slots=1, prefix_cache_gb=1e-9)
    got = one_by_one(engine, [turn1, turn2, other, turn2])
    assert len(engine.prefix_cache) == 0
    assert [x.token_ids for x in got] == want
    # turn 2 in place: turn 1's chunks ending at 32 and 64 (turn 2's third chunk is [64, 96), not [64, 90));
    # other: nothing; turn 2 again, after other took the row: nothing
    assert [x.cached_tokens for x in got] == [0, 64, 0, 0]


def test_request_cancelled_mid_prefill_leaves_only_whole_blocks():
    model = tiny_model(SPARSE, torch.float32)
    prompt = prompts_sharing_a_prefix(3)[0]  # 150 tokens: 5 chunks of 32, one a step
    engine = Engine(model, prefill_chunk=CHUNK, prefix_cache_gb=0.01)
    req = engine.add_request(prompt, GREEDY)
    engine.step()
    engine.step()
    assert req.prefilled == 2 * CHUNK and not req.out.token_ids
    engine.cancel(req)
    engine.step()
    assert req.out.finish_reason == "cancelled" and len(engine.prefix_cache) == 2
    again = engine.generate([prompt], GREEDY)[0]
    assert again.cached_tokens == 2 * CHUNK
    assert again.token_ids == Engine(model, prefill_chunk=CHUNK).generate([prompt], GREEDY)[0].token_ids


def test_new_weights_drop_the_blocks():
    model = tiny_model(None, torch.float32)
    prompt = prompts_sharing_a_prefix()[0]
    engine = Engine(model, prefill_chunk=CHUNK, prefix_cache_gb=0.01)
    engine.generate([prompt], GREEDY)
    other = tiny_model(None, torch.float32, seed=1)
    engine.use_model(other)
    got = engine.generate([prompt], GREEDY)[0]
    assert got.cached_tokens == 0 and len(engine.prefix_cache) == 5  # the new model's chunks of the prompt
    assert got.token_ids == Engine(other, prefill_chunk=CHUNK).generate([prompt], GREEDY)[0].token_ids
