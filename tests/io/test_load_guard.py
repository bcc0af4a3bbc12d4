"""Garbage weights under a valid header (safetensors and GGUF) are refused at load, naming the first bad tensor;
MINICPM4_SKIP_FINITE_CHECK=1 loads them anyway. Random bytes read as floats hold NaN or inf with probability
1/256 each (an all-ones exponent), so a tensor of a few thousand values of noise is caught; the seed is fixed."""

import json
import random

import pytest
import torch
from model_util import random_model
from test_gguf import _write_gguf
from train_util import small_tokenizer

import minicpm4
from minicpm4.config import ModelConfig
from minicpm4.errors import CheckpointError
from minicpm4.weights import first_nonfinite

SEED = 5


def overwrite(path, start: int, end: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[start:end] = random.Random(SEED).randbytes(end - start)
    path.write_bytes(bytes(raw))


@pytest.fixture
def hf_dir(tmp_path, real_text):
    tok = small_tokenizer(real_text, vocab_size=300)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return minicpm4.save_pretrained(random_model(cfg), tok, tmp_path / "model")


def test_safetensors_with_garbage_bytes_is_refused(hf_dir, monkeypatch):
    file = hf_dir / "model.safetensors"
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    start, end = json.loads(raw[8:8 + n])["model.layers.1.self_attn.o_proj.weight"]["data_offsets"]
    overwrite(file, 8 + n + start, 8 + n + end)
    with pytest.raises(CheckpointError, match=r"/model: tensor model\.layers\.1\.self_attn\.o_proj\.weight "
                                              r"holds NaN or infinite values"):
        minicpm4.load(hf_dir, dtype="fp32")
    monkeypatch.setenv("MINICPM4_SKIP_FINITE_CHECK", "1")
    model, _ = minicpm4.load(hf_dir, dtype="fp32")
    assert not torch.isfinite(model.model.layers[1].self_attn.o_proj.weight).all()


def test_gguf_with_garbage_bytes_is_refused(tmp_path):
    import gguf
    path = tmp_path / "tiny.gguf"
    _write_gguf(path)
    embd = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "token_embd.weight")
    overwrite(path, embd.data_offset, embd.data_offset + embd.n_bytes)
    with pytest.raises(CheckpointError, match=r"tiny\.gguf: tensor model\.embed_tokens\.weight holds NaN"):
        minicpm4.load(path, dtype="fp32")


def test_large_finite_values_are_not_mistaken_for_garbage():
    # their sum overflows to inf, the cheap test's only false alarm; the exact check then clears them
    assert first_nonfinite({"big": torch.full((8,), 3e38), "small": torch.ones(3)}) is None
    assert first_nonfinite({"ok": torch.ones(2), "opt": {"state": [torch.tensor([1.0, float("-inf")])]}}) == "opt.state.0"
    assert first_nonfinite({"ids": torch.tensor([2**62]), "empty": torch.empty(0)}) is None
