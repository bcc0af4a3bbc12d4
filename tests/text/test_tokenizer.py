"""Tokenizer: ids, decoding and chat prompts must equal transformers' for the same GGUF (byte-level BPE from
SmolLM2, and a SentencePiece-style GGUF written here); save/from_dir round trips; StreamDecoder."""

import json
import sys
import types

import gguf
import numpy as np
import pytest

from minicpm4.errors import CheckpointError, InputError
from minicpm4.io.gguf import read_gguf
from minicpm4.text.tokenizer import StreamDecoder, Tokenizer

TEXTS = [
    "Hello world",
    "  two leading spaces",
    "trailing spaces   ",
    "tabs\tand\nnewlines\n\n\nend",
    "multiple     spaces     between",
    "digits 1234567890, 3.14159 and 1,000,000",
    "unicode: héllo wörld ñ ç ÀÉÎÕÜ",
    "CJK: 你好，世界！日本語のテキスト 한국어",
    "emoji: 😀👍🏽 🇫🇷 👨‍👩‍👧",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|im_end|>more<|endoftext|>tail",
    "not special: <|im_start| <im_end> |>",
    "code: def f(x):\n    return x ** 2  # comment\n",
    "URL https://example.com/path?q=1&b=2#frag",
    "don't can't I'm we'll they've",
    "mixed\r\nline endings\r",
    "math: ∑∫√π ≤ ≥ ≠ ∞",
    "Arabic مرحبا Hebrew שלום",
    "zero\u200bwidth and\u00a0nbsp",
    " ",
    "\n",
    "",
]
CONVERSATIONS = {
    "system": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"},
               {"role": "assistant", "content": "Hello. 👋"}, {"role": "user", "content": "What is 2+2?"}],
    "no_system": [{"role": "user", "content": "Bonjour, ça va ?"}, {"role": "assistant", "content": "Oui."},
                  {"role": "user", "content": "Et toi\n?"}],
}
STREAM_TEXT = "Streaming 😀 emoji, 日本語 CJK, ñandú, and 👨‍👩‍👧 families.\nDone!"


@pytest.fixture(scope="module")
def ours(smollm_checkpoint):
    return smollm_checkpoint.text_tokenizer()


@pytest.fixture(scope="module")
def hf_tok(smollm_gguf):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm_gguf.parent, gguf_file=smollm_gguf.name)


def _sentencepiece_vocab(byte_level: Tokenizer) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary (▁ for spaces, <0xNN> byte tokens, scores) made from SmolLM2's
    byte-level tokens, in merge-rank order, so it tokenizes real text realistically."""
    vocab = byte_level.backend.get_vocab(with_added_tokens=False)
    pieces: dict[str, None] = {}
    for token in sorted(vocab, key=vocab.get)[17:4000]:  # after SmolLM2's 17 special tokens
        text = byte_level.decode([vocab[token]])
        if text and "\ufffd" not in text:
            pieces.setdefault(text.replace(" ", "▁"))
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces,
              "<|im_start|>", "<|im_end|>", "<think>"]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0] * 3
    token_types = [2, 3, 3] + [6] * 256 + [1] * len(pieces) + [3, 3, 4]
    return tokens, scores, token_types


def _write_sentencepiece_gguf(path, vocab, add_space_prefix=None) -> None:
    tokens, scores, token_types = vocab
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(token_types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    if add_space_prefix is not None:
        writer.add_add_space_prefix(add_space_prefix)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                             "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _tokenizer_only(path) -> Tokenizer:
    """Tokenizer from a GGUF that has metadata only (read_gguf would reject it for lacking weights)."""
    from minicpm4.io.gguf import _tokenizer_from_metadata
    reader = gguf.GGUFReader(str(path))
    metadata = {key: field.contents() for key, field in reader.fields.items()}
    return Tokenizer(*_tokenizer_from_metadata(str(path), metadata))


@pytest.fixture(scope="module")
def spm_vocab(ours):
    return _sentencepiece_vocab(ours)


@pytest.fixture(scope="module")
def spm_pair(tmp_path_factory, spm_vocab):
    from transformers import AutoTokenizer
    directory = tmp_path_factory.mktemp("spm")
    _write_sentencepiece_gguf(directory / "spm.gguf", spm_vocab)
    return _tokenizer_only(directory / "spm.gguf"), AutoTokenizer.from_pretrained(directory, gguf_file="spm.gguf")


# ---- byte-level BPE (SmolLM2) ------------------------------------------------------------------------

@pytest.mark.parametrize("add_special_tokens", [False, True])
def test_byte_level_ids_match_transformers(ours, hf_tok, add_special_tokens):
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens) == hf_tok.encode(text, add_special_tokens=add_special_tokens), text


def test_byte_level_decode_matches_transformers_and_round_trips(ours, hf_tok):
    for text in TEXTS:
        ids = ours.encode(text)
        assert ours.decode(ids) == hf_tok.decode(ids) == text
        assert ours.decode(ids, skip_special_tokens=True) == hf_tok.decode(ids, skip_special_tokens=True)


def test_special_tokens_in_text_stay_whole(ours):
    assert ours.encode("<|im_start|>user\nhi<|im_end|>")[0] == 1
    assert ours.encode("<|im_start|>user\nhi<|im_end|>")[-1] == 2
    assert 1 not in ours.encode("<|im_start|")
    assert ours.decode(ours.encode("<|im_start|>user\nhi<|im_end|>"), skip_special_tokens=True) == "user\nhi"


def test_byte_level_properties(ours):
    assert ours.vocab_size == 49152
    assert ours.bos_token_id == 1 and ours.eos_token_id == 2
    assert ours.eos_token_ids == [2]  # eos is <|im_end|> itself: listed once
    assert ours.encode("Hi", add_special_tokens=True) == ours.encode("Hi")  # add_bos_token is false here


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(ours, hf_tok, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    expected = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
    if name == "no_system":  # SmolLM2's template supplies its own system prompt
        assert expected.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_chat_template_features():
    template = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}"
                "{{ bos_token }}{% for m in messages %}{% generation %}{{ m['content'] | tojson }}{% endgeneration %}"
                "{% endfor %}{{ extra }}{% if tools %}{{ tools | length }}{% endif %}")
    from tokenizers import Tokenizer as Backend, models
    tok = Tokenizer(Backend(models.BPE()), {"bos_token": "<s>", "chat_template": template})
    rendered = tok.apply_chat_template([{"role": "user", "content": "<a&b> ü", "name": None}], extra="!",
                                       tools=[{"name": "f"}])
    assert rendered == '<s>"<a&b> ü"!1'  # tojson neither HTML-escapes nor ASCII-escapes
    with pytest.raises(InputError, match="first must be user"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}])
    default = Tokenizer(Backend(models.BPE()), {})
    assert default.chat_template is None
    assert default.apply_chat_template([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_save_and_from_dir_round_trip(ours, hf_tok, tmp_path):
    from transformers import AutoTokenizer
    ours.save(tmp_path)
    assert not list(tmp_path.glob("*.tmp"))
    again = Tokenizer.from_dir(tmp_path)
    reloaded_by_hf = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert again.encode(text, True) == ours.encode(text, True) == reloaded_by_hf.encode(text), text
    messages = CONVERSATIONS["system"]
    assert again.apply_chat_template(messages) == ours.apply_chat_template(messages)
    assert again.eos_token_ids == ours.eos_token_ids and again.bos_token_id == ours.bos_token_id


def test_from_dir_reads_transformers_layout(spm_pair, tmp_path):
    """A directory transformers wrote: tokenizer.json whose post-processor adds BOS itself, the template in
    chat_template.jinja. BOS must appear once, as with transformers."""
    _, hf_spm = spm_pair
    hf_spm.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").is_file()
    loaded = Tokenizer.from_dir(tmp_path)
    for text in TEXTS:
        assert loaded.encode(text, True) == hf_spm.encode(text), text
    assert loaded.encode("Hi", True).count(1) == 1
    messages = CONVERSATIONS["no_system"]
    assert loaded.apply_chat_template(messages) == hf_spm.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)


def test_from_dir_errors(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="neither tokenizer.json nor tokenizer.model"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\x00")
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # as if it were not installed
    with pytest.raises(CheckpointError, match="tokenizer.model: .*pip install sentencepiece"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer.json: cannot be parsed"):
        Tokenizer.from_dir(tmp_path)


def test_sentencepiece_model_conversion(spm_vocab, spm_pair, tmp_path, monkeypatch):
    """tokenizer.model goes through the same builder as a GGUF SentencePiece vocabulary; a stand-in for the
    sentencepiece package serves the vocabulary (the real package is not a dependency)."""
    tokens, scores, token_types = spm_vocab

    class FakeProcessor:
        def __init__(self, model_file):
            assert model_file.endswith("tokenizer.model")

        get_piece_size = staticmethod(lambda: len(tokens))
        id_to_piece = staticmethod(tokens.__getitem__)
        get_score = staticmethod(scores.__getitem__)
        is_control = staticmethod(lambda i: token_types[i] == 3)
        bos_id, eos_id, unk_id, pad_id = (staticmethod(lambda value=value: value) for value in (1, 2, 0, -1))

    monkeypatch.setitem(sys.modules, "sentencepiece", types.SimpleNamespace(SentencePieceProcessor=FakeProcessor))
    (tmp_path / "tokenizer.model").write_bytes(b"stand-in")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}"}))
    converted = Tokenizer.from_dir(tmp_path)
    from_gguf, _ = spm_pair
    for text in TEXTS:
        assert converted.encode(text, True) == from_gguf.encode(text, True), text
    assert converted.config["bos_token"] == "<s>" and converted.config["pad_token"] is None
    assert converted.apply_chat_template([{"role": "user", "content": "x"}]) == "x"


# ---- SentencePiece-style GGUF --------------------------------------------------------------------------

@pytest.mark.parametrize("add_special_tokens", [False, True])
def test_sentencepiece_ids_match_transformers(spm_pair, add_special_tokens):
    ours_spm, hf_spm = spm_pair
    for text in TEXTS + ["<unk> <s> x", "<think>ok</think>", "ab<|im_end|> cd"]:
        expected = hf_spm.encode(text, add_special_tokens=add_special_tokens)
        assert ours_spm.encode(text, add_special_tokens) == expected, text


def test_sentencepiece_decode_matches_transformers(spm_pair):
    ours_spm, hf_spm = spm_pair
    for text in TEXTS:
        ids = ours_spm.encode(text, True)
        assert ours_spm.decode(ids) == hf_spm.decode(ids), text
        assert ours_spm.decode(ids, skip_special_tokens=True) == hf_spm.decode(ids, skip_special_tokens=True), text
    assert ours_spm.encode("Hi", True)[0] == 1 and ours_spm.eos_token_ids == [2, ours_spm.backend.token_to_id("<|im_end|>")]


def test_sentencepiece_without_space_prefix(spm_vocab, tmp_path):
    """add_space_prefix=false (llama.cpp's flag) means no '▁' before the first word."""
    _write_sentencepiece_gguf(tmp_path / "plain.gguf", spm_vocab, add_space_prefix=False)
    plain = _tokenizer_only(tmp_path / "plain.gguf")
    ids = plain.encode("Hello world")
    assert not plain.backend.id_to_token(ids[0]).startswith("▁")
    assert plain.decode(ids) == "Hello world"


def test_read_gguf_rejects_unknown_tokenizer(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "t5.gguf"), "llama")
    for key, value in (("llama.context_length", 8), ("llama.embedding_length", 4), ("llama.block_count", 0),
                       ("llama.feed_forward_length", 4), ("llama.attention.head_count", 1)):
        writer.add_uint32(key, value)
    writer.add_tokenizer_model("t5")
    writer.add_token_list(["a", "b"])
    writer.add_tensor("token_embd.weight", np.zeros((2, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"t5\.gguf: tokenizer type 't5' is not supported"):
        read_gguf(tmp_path / "t5.gguf")


# ---- streaming -------------------------------------------------------------------------------------------

def _stream(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    decoder = StreamDecoder(tokenizer)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


def test_stream_decoder_byte_level(ours):
    ids = ours.encode(STREAM_TEXT)
    pieces = _stream(ours, ids)
    assert "".join(pieces) == ours.decode(ids) == STREAM_TEXT
    assert not any("\ufffd" in piece for piece in pieces)
    assert "" in pieces[:-1]  # an emoji's bytes span several tokens: held back until complete
    assert pieces[-1] == ""


def test_stream_decoder_sentencepiece(spm_pair):
    ours_spm, _ = spm_pair
    ids = ours_spm.encode(STREAM_TEXT)
    pieces = _stream(ours_spm, ids)
    assert "".join(pieces) == ours_spm.decode(ids) == STREAM_TEXT
    assert not any("\ufffd" in piece for piece in pieces)
    assert " emoji," in "".join(pieces[:len(pieces) // 2])  # inner spaces survive SentencePiece's strip


def test_stream_decoder_skips_specials_and_flushes_incomplete(ours):
    decoder = StreamDecoder(ours, skip_special_tokens=True)
    text = "".join(decoder.push(i) for i in ours.encode("<|im_start|>assistant\nOK<|im_end|>"))
    assert text + decoder.flush() == "assistant\nOK"
    emoji = ours.encode("😀")
    assert len(emoji) > 1
    decoder = StreamDecoder(ours)
    assert decoder.push(emoji[0]) == ""
    assert decoder.flush() == ours.decode(emoji[:1])  # an incomplete character comes out as U+FFFD at the end
