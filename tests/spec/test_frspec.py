"""FR-Spec vocabulary: counting, top-N with EOS forced in, the file format, and the restricted draft head."""

from collections import Counter

import pytest
import torch
from model_util import random_model

from minicpm4.config import tiny
from minicpm4.errors import CheckpointError, InputError
from minicpm4.spec.eagle import EagleDraft
from minicpm4.spec.frspec import build_vocab, count_tokens, load_vocab, save_vocab, top_vocab


def encode(text):  # a stand-in tokenizer: one id per character
    return [ord(c) % 64 for c in text]


def test_counts_match_a_plain_counter(real_text):
    lines = real_text.splitlines()[:300]
    counts = count_tokens(lines, encode, 64, batch=1)  # batch=1: several flushes of the buffer
    ref = Counter(i for line in lines if line.strip() for i in encode(line))
    assert counts.tolist() == [ref.get(i, 0) for i in range(64)]


def test_top_vocab_keeps_most_frequent_and_eos():
    counts = torch.tensor([5, 100, 7, 100, 0, 50, 3, 9])
    ids = top_vocab(counts, 4, forced=[4])  # id 4 never occurs but is an EOS id
    assert ids.tolist() == [1, 3, 5, 4]  # by count; the tie 1/3 goes to the smaller id first; EOS kept at the end
    assert top_vocab(counts, 3).tolist() == [1, 3, 5]
    with pytest.raises(InputError):
        top_vocab(counts, 1, forced=[4, 6])
    with pytest.raises(InputError):
        top_vocab(counts, 9)


def test_build_save_load_roundtrip(tmp_path, real_text):
    corpus = tmp_path / "c.txt"
    corpus.write_text(real_text)
    ids, counts = build_vocab([corpus], encode, 64, 10, eos_ids=[63])
    assert 63 in ids.tolist() and ids.numel() == 10
    top9 = set(torch.sort(counts, descending=True, stable=True).indices[:9].tolist())
    assert top9 <= set(ids.tolist())
    path = save_vocab(ids, tmp_path / "freq_10.pt")
    assert torch.equal(load_vocab(path, 64), ids)
    with pytest.raises(CheckpointError, match="outside"):
        load_vocab(path, 32)
    torch.save({"ids": ids}, tmp_path / "dict.pt")
    assert torch.equal(load_vocab(tmp_path / "dict.pt", 64), ids)


def test_frspec_head_gathers_target_rows():
    target = random_model(tiny(), seed=0)
    vocab = torch.tensor([7, 3, 500, 42, 2])
    full, fr = EagleDraft.for_target(target), EagleDraft.for_target(target).bind(target, vocab)
    ids, feats, pos = torch.tensor([[5, 6, 7]]), torch.randn(1, 3, 128), torch.arange(3)[None]
    logits_full, g_full = full(ids, feats, pos)
    logits_fr, g_fr = fr(ids, feats, pos)
    torch.testing.assert_close(g_fr, g_full)
    torch.testing.assert_close(logits_fr, logits_full[..., vocab])  # the head's rows are the target's rows
    assert fr.full_ids(torch.tensor([2, 0])).tolist() == [500, 7]
