"""The default model (a Llama-architecture GGUF) against Hugging Face transformers loading the same file.

transformers reads GGUF with its own dequantizer and its own LlamaForCausalLM, so agreement checks our
GGUF reader (names, q/k permutation, tied head), our Llama special case of the MiniCPM4 config, and the
forward pass, on a few hundred tokens of real text in fp32.
"""

import pytest
import torch

import minicpm4
from minicpm4.engine.engine import Engine
from minicpm4.engine.sampling import SamplingParams

transformers = pytest.importorskip("transformers")  # part of the dev extra


@pytest.fixture(scope="module")
def hf_model(smollm_gguf):
    m = transformers.AutoModelForCausalLM.from_pretrained(str(smollm_gguf.parent), gguf_file=smollm_gguf.name,
                                                          dtype=torch.float32)
    return m.eval()


@pytest.fixture(scope="module")
def ours(smollm_gguf):
    return minicpm4.load(smollm_gguf, dtype="fp32")


@pytest.fixture(scope="module")
def text_ids(ours, real_text):
    ids = ours[1].encode(real_text)
    assert len(ids) >= 300
    return torch.tensor([ids[:300]])


def test_logits_match_transformers_fp32(hf_model, ours, text_ids):
    with torch.no_grad():
        ref = hf_model(text_ids).logits.float()
        got = ours[0](text_ids)
    diff = (ref - got).abs().max().item()
    print(f"max abs logit diff over {text_ids.shape[1]} tokens: {diff:.2e}")
    assert diff <= 1e-3


def test_greedy_32_tokens_identical_to_transformers(hf_model, ours, text_ids):
    model, tok = ours
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Write a short poem about the sea."}]))
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    ref_tokens = ref[0, len(prompt):].tolist()
    got = Engine(model).generate([prompt], SamplingParams(max_new_tokens=32, ignore_eos=True))[0].token_ids
    assert got == ref_tokens
    # and a prompt of real text continued raw, through chunked prefill
    raw = text_ids[0, :200].tolist()
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([raw]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    got = Engine(model, prefill_chunk=64).generate([raw], SamplingParams(max_new_tokens=32, ignore_eos=True))[0]
    assert got.token_ids == ref[0, len(raw):].tolist()
