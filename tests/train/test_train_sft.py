"""SFT: loss exactly on assistant tokens (tool calls included), packed rows computed as if each conversation were
alone, and a short SFT run from a saved model."""

import json

import pytest
import torch
from train_util import TINY_MODEL, small_tokenizer, tiny_config

import minicpm4
from minicpm4.config import ModelConfig
from minicpm4.model.decoder import MiniCPM4ForCausalLM
from minicpm4.train.chat_data import IGNORE, ChatLoader, encode_conversation, example_tensors
from minicpm4.train.metrics import read_metrics
from minicpm4.train.trainer import train

CALL = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two integers.",
                                           "parameters": {"type": "object", "properties": {
                                               "a": {"type": "integer"}, "b": {"type": "integer"}}}}}]
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "5"},
    {"role": "assistant", "content": "It is 5."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You are welcome."},
]


@pytest.fixture(scope="module")
def tok(real_text):
    return small_tokenizer(real_text)


def runs(ids, flags, want):
    """Token runs whose flag equals `want`, each decoded to text."""
    out, cur = [], []
    for i, f in zip(ids, flags):
        if f == want:
            cur.append(i)
        elif cur:
            out, cur = out + [cur], []
    return out + ([cur] if cur else [])


@pytest.mark.parametrize("which", ["small", "default"])
def test_labels_are_exactly_the_assistant_turns(which, tok):
    if which == "default":
        from minicpm4.io.loader import default_model_dir
        tok = minicpm4.text.tokenizer.Tokenizer.from_dir(default_model_dir())
    ids, assistant = encode_conversation(tok, CONVERSATION, TOOLS)
    x, labels = example_tensors(ids, assistant)
    # position t is a target exactly when token t+1 is an assistant token, and then its label is that token
    targets = (labels != IGNORE).tolist()
    assert targets == assistant[1:] + [False]
    assert all(labels[t] == x[t + 1] for t in range(len(ids) - 1) if targets[t])
    # the assistant runs decode to the turns' texts with their end-of-turn marker, and nothing else;
    # the call is written in the tool-call JSON format the server parses
    texts = [tok.decode(r) for r in runs(ids, assistant, True)]
    assert len(texts) == 3 and texts[1:] == ["It is 5.<|im_end|>\n", "You are welcome.<|im_end|>\n"]
    assert texts[0].startswith("<tool_call>") and '"name": "add"' in texts[0] and texts[0].endswith("<|im_end|>\n")
    # everything else (system, tools prompt, user turns, tool result, assistant headers) is masked
    rest = "".join(tok.decode(r) for r in runs(ids, assistant, False))
    for text in ("You are terse.", "What is 2 + 3?", "<tool_response>\n5\n</tool_response>", "Thanks!"):
        assert text in rest
    assert rest.count("<|im_start|>assistant\n") == 3 and "It is 5." not in rest


def test_packed_row_equals_each_conversation_alone(tmp_path, tok):
    lines = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                           {"role": "assistant", "content": "Answer " * (i + 1)}]} for i in range(6)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    loader = ChatLoader(tmp_path / "chat.jsonl", tok, seq_len=200, batch_size=2, seed=0)
    batch = loader.next_batch()
    assert batch["segments"][0].max() >= 2  # several conversations share the row
    cfg = ModelConfig.from_dict(dict(model_type="minicpm", vocab_size=tok.vocab_size, **TINY_MODEL,
                                     scale_emb=12, scale_depth=1.4, tie_word_embeddings=False))
    torch.manual_seed(0)
    model = MiniCPM4ForCausalLM(cfg).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: a second thread on shared cores costs far more than it saves
    with torch.no_grad():
        packed = model(batch["input_ids"], segments=batch["segments"])
        for row in range(2):
            seg = batch["segments"][row]
            for s in seg.unique().tolist():
                cols = (seg == s).nonzero().flatten()
                alone = model(batch["input_ids"][row, cols][None])[0]
                torch.testing.assert_close(packed[row, cols], alone, atol=1e-5, rtol=1e-5)
    # without segments the second conversation would see the first: the outputs differ
    with torch.no_grad():
        plain = model(batch["input_ids"])
    torch.set_num_threads(threads)
    cols = (batch["segments"][0] == 1).nonzero().flatten()
    assert not torch.allclose(plain[0, cols], packed[0, cols], atol=1e-3)


def test_sft_run_from_a_saved_model(tmp_path, tok):
    cfg = ModelConfig.from_dict(dict(model_type="minicpm", vocab_size=tok.vocab_size, **TINY_MODEL,
                                     scale_emb=12, scale_depth=1.4, tie_word_embeddings=True,
                                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    torch.manual_seed(0)
    minicpm4.save_pretrained(MiniCPM4ForCausalLM(cfg), tok, tmp_path / "base")
    rows = [{"messages": [{"role": "user", "content": f"Say hello to {n}."},
                          {"role": "assistant", "content": f"Hello, {n}!"}]} for n in ("Ann", "Bob", "Cy", "Di")]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "sft"
    result = train(tiny_config(tmp_path / "chat.jsonl", run, task="sft", model=str(tmp_path / "base"),
                               model_overrides={}, seq_len=64, lr=0.05, steps=12))
    curve = [m["loss"] for m in read_metrics(run / "metrics.jsonl")]
    assert max(curve[-3:]) < curve[0] - 1.0
    model, _ = minicpm4.load(result["checkpoint"] / "model", dtype="fp32")
    assert model.config.tie_word_embeddings and model.config.vocab_size == tok.vocab_size
