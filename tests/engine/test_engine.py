"""Engine (token ids) and LLM (text) behaviour on the real default model, plus sampling rules on literal logits."""

import pytest
import torch

import minicpm4
from minicpm4.engine.engine import Engine
from minicpm4.engine.sampling import SamplingParams, apply_repetition_penalty, filter_logits, sample_token
from minicpm4.errors import InputError
from minicpm4.model.native_stack import attach
from minicpm4.serve.llm import LLM, cut_at_stop


@pytest.fixture(scope="module")
def llm(smollm_gguf):
    model, tok = minicpm4.load(smollm_gguf, dtype="fp32")
    return LLM(attach(model), tok)  # fused, as LLM.load gives it


def chat_ids(llm, text):
    return llm.encode_chat([{"role": "user", "content": text}])


def test_batch_of_different_lengths_equals_one_by_one(llm, real_text):
    ids = llm.tokenizer.encode(real_text)
    prompts = [chat_ids(llm, "Name three colors."), ids[:57], chat_ids(llm, "What is 2+2? Explain.")]
    p = SamplingParams(max_new_tokens=12, ignore_eos=True)
    batched = llm.engine.generate(prompts, p)
    single = [llm.engine.generate([x], p)[0] for x in prompts]
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    assert all(len(g.token_ids) == 12 and g.finish_reason == "length" for g in batched)


def test_batch_rows_finish_independently(llm):
    prompts = [chat_ids(llm, "Say hi."), chat_ids(llm, "Count from one to twenty in words.")]
    params = [SamplingParams(max_new_tokens=3), SamplingParams(max_new_tokens=15)]
    out = llm.engine.generate(prompts, params)
    assert len(out[0].token_ids) <= 3 and len(out[1].token_ids) <= 15
    assert out[1].token_ids == llm.engine.generate([prompts[1]], params[1])[0].token_ids


def test_requests_joining_mid_flight_get_what_they_get_alone(llm, real_text):
    """Continuous batching: requests arrive while others decode, a long prompt prefills in chunks between
    decode steps, and only two slots exist; every greedy output equals the request run alone."""
    ids = llm.tokenizer.encode(real_text)
    prompts = [chat_ids(llm, "Name three colors."), ids[:300], chat_ids(llm, "What is 2+2?"), ids[40:90]]
    p = SamplingParams(max_new_tokens=10, ignore_eos=True)
    alone = [llm.engine.generate([x], p)[0].token_ids for x in prompts]
    eng = Engine(llm.model, prefill_chunk=64, max_slots=2)
    first = eng.add_request(prompts[0], p)
    for _ in range(3):
        eng.step()
    assert len(first.out.token_ids) == 4  # step 1 samples from the prompt and decodes once; then one per step
    later = [eng.add_request(x, p) for x in prompts[1:]]
    produced_while_prefilling = 0
    while not all(r.finished for r in [first, *later]):
        events = eng.step()
        assert eng.running <= 2
        if later[0].slot >= 0 and later[0].prefilled < len(prompts[1]):
            produced_while_prefilling += any(r is first for r, _ in events)
    assert produced_while_prefilling >= 2  # the 300-token prompt (5 chunks of 64) did not stall the first stream
    assert [r.out.token_ids for r in [first, *later]] == alone
    assert not eng.has_work and eng.slots == []


def test_cancel_frees_the_slot_and_spares_the_others(llm):
    eng = Engine(llm.model, max_slots=1)
    p = SamplingParams(max_new_tokens=8, ignore_eos=True)
    a = eng.add_request(chat_ids(llm, "Tell me a story."), p)
    b = eng.add_request(chat_ids(llm, "Name three colors."), p)  # waits: one slot
    eng.step()
    assert a.slot == 0 and b.slot == -1 and len(a.out.token_ids) == 2
    eng.cancel(a)
    while not b.finished:
        eng.step()
    assert a.out.finish_reason == "cancelled" and len(a.out.token_ids) == 2
    assert b.out.token_ids == llm.engine.generate([chat_ids(llm, "Name three colors.")], p)[0].token_ids
    waiting = eng.add_request([1, 2, 3], p)
    eng.cancel(waiting)
    eng.step()
    assert waiting.out.finish_reason == "cancelled" and not eng.has_work


def test_closing_a_stream_early_cancels_it(llm):
    eng = Engine(llm.model)
    stream = eng.stream(chat_ids(llm, "Count to fifty."), SamplingParams(max_new_tokens=30, ignore_eos=True))
    assert [next(stream) for _ in range(3)]
    stream.close()
    assert not eng.has_work


def test_chunked_prefill_equals_single_chunk(llm, real_text):
    prompt = llm.tokenizer.encode(real_text)[:700]
    p = SamplingParams(max_new_tokens=8, ignore_eos=True)
    a = Engine(llm.model, prefill_chunk=128).generate([prompt], p)[0].token_ids
    b = Engine(llm.model, prefill_chunk=4096).generate([prompt], p)[0].token_ids
    assert a == b


def test_stops_on_eos_and_answers(llm):
    r = llm.chat([{"role": "user", "content": "What is the capital of France?"}], SamplingParams(max_new_tokens=40))
    assert r.generation.finish_reason == "stop"
    assert "Paris" in r.text and "<|im_end|>" not in r.text


def test_stop_string_cuts_text_and_stream_matches(llm):
    msgs = [{"role": "user", "content": "List the numbers from 1 to 10, separated by commas."}]
    full = llm.chat(msgs, SamplingParams(max_new_tokens=40)).text
    assert "4" in full
    stop = full[full.index("4"):full.index("4") + 1]
    cut = llm.chat(msgs, SamplingParams(max_new_tokens=40), stop=[stop])
    assert cut.text == full[:full.index(stop)] and cut.generation.finish_reason == "stop"
    streamed = "".join(llm.stream_ids(llm.encode_chat(msgs), SamplingParams(max_new_tokens=40), stop=[stop]))
    assert streamed == cut.text
    assert "".join(llm.stream_ids(llm.encode_chat(msgs), SamplingParams(max_new_tokens=40))) == full


def test_seeded_sampling_is_reproducible_and_differs_across_seeds(llm):
    prompt = chat_ids(llm, "Tell me a story about a dragon.")
    def run(seed):
        return llm.engine.generate([prompt], SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.95,
                                                            seed=seed, ignore_eos=True))[0].token_ids
    assert run(1) == run(1)
    assert run(1) != run(2)


def test_max_new_tokens_and_context_limit(llm):
    prompt = chat_ids(llm, "Hello")
    assert len(llm.engine.generate([prompt], SamplingParams(max_new_tokens=5, ignore_eos=True))[0].token_ids) == 5
    short = Engine(llm.model, max_len=len(prompt) + 4)
    g = short.generate([prompt], SamplingParams(max_new_tokens=50, ignore_eos=True))[0]
    assert g.finish_reason == "length" and len(prompt) + len(g.token_ids) <= len(prompt) + 4


def test_prompt_longer_than_context_is_input_error(llm):
    with pytest.raises(InputError, match="does not fit the context of 8192 tokens"):
        llm.engine.generate([[1] * 9000])
    with pytest.raises(InputError, match="outside the vocabulary"):
        llm.engine.generate([[5, 10**6]])
    with pytest.raises(InputError, match="empty"):
        llm.engine.generate([[]])
    with pytest.raises(InputError, match="top_p"):
        SamplingParams(top_p=0)


# ---- sampling rules on literal logits ----
def test_top_k_top_p_min_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = lambda **kw: torch.isfinite(filter_logits(logits, SamplingParams(temperature=1.0, **kw))).tolist()
    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_p=0.8) == [True, True, False, False]  # 0.5 + 0.3 reaches 0.8
    assert kept(top_p=0.81) == [True, True, True, False]
    assert kept(top_p=0.4) == [True, False, False, False]  # the top token always stays
    assert kept(min_p=0.5) == [True, True, False, False]  # p >= 0.25
    assert kept() == [True, True, True, True]


def test_temperature_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    g = torch.Generator().manual_seed(0)
    p = SamplingParams(temperature=1.0)
    counts = torch.bincount(torch.tensor([sample_token(probs.log(), p, torch.tensor([]), g) for _ in range(4000)]),
                            minlength=3).float() / 4000
    assert torch.allclose(counts, probs, atol=0.03)


def test_repetition_penalty_matches_ctrl_rule():
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_repetition_penalty(logits, torch.tensor([0, 1, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]


def test_cut_at_stop_takes_the_earliest():
    assert cut_at_stop("abc END x STOP", ["STOP", "END"]) == ("abc ", True)
    assert cut_at_stop("abc", ["zz"]) == ("abc", False)
