"""Token shards (data tokenize) and the packed loader: contents, dtype, parallel = serial, resume, determinism."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from train_util import make_shards, paragraphs, small_tokenizer

from minicpm4.errors import InputError
from minicpm4.train.shard_writer import token_dtype, tokenize_to_shards
from minicpm4.train.token_loader import PackedLoader, TokenShards


@pytest.fixture(scope="module")
def tok(real_text):
    return small_tokenizer(real_text)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, real_text, tok):
    return make_shards(tmp_path_factory.mktemp("shards"), real_text, tok)


def test_shards_hold_each_document_then_eos(shards, tok, real_text):
    index = json.loads((shards / "index.json").read_text())
    assert index["dtype"] == "uint16" and index["vocab_size"] == tok.vocab_size
    paras = paragraphs(real_text)
    half = len(paras) // 2
    # independent expectation: the txt file is one document, each JSONL line another, each BOS + text + EOS
    docs = ["\n\n".join(paras[:half]), *paras[half:]]
    expected = [t for d in docs for t in tok.encode(d, add_special_tokens=True) + [tok.eos_token_id]]
    stream = np.concatenate([np.fromfile(shards / s["file"], dtype=np.uint16) for s in index["shards"]])
    assert stream.tolist() == expected
    assert index["documents"] == len(docs) and index["tokens"] == len(expected)
    assert (shards / "tokenizer" / "tokenizer.json").is_file()


def test_dtype_follows_vocabulary_size():
    assert token_dtype(49152) == np.uint16 and token_dtype(65536) == np.uint16  # ids up to 65535
    assert token_dtype(65537) == np.uint32 and token_dtype(73448) == np.uint32


def test_parallel_equals_serial_and_rerun_skips_done_shards(tmp_path, real_text, tok):
    files = []
    for i, p in enumerate(paragraphs(real_text)[:6]):
        (tmp_path / f"{i}.txt").write_text(p)
        files.append(str(tmp_path / f"{i}.txt"))
    a = tokenize_to_shards(files, tok, tmp_path / "serial", workers=1).parent
    b = tokenize_to_shards(files, tok, tmp_path / "parallel", workers=2).parent
    for i in range(6):
        assert (a / f"{i:05d}.bin").read_bytes() == (b / f"{i:05d}.bin").read_bytes()
    before = {f: os.stat(a / f"{f:05d}.bin").st_mtime_ns for f in range(6)}
    (tmp_path / "3.txt").write_text("a changed document, long enough to differ")
    logs = []
    tokenize_to_shards(files, tok, a, workers=1, log=logs.append)
    assert "5 of 6 shards already done, skipped" in logs[0]
    after = {f: os.stat(a / f"{f:05d}.bin").st_mtime_ns for f in range(6)}
    assert [f for f in range(6) if after[f] != before[f]] == [3]
    assert np.fromfile(a / "00003.bin", dtype=np.uint16).tolist()[1:-1] == tok.encode("a changed document, long "
                                                                                       "enough to differ")


def test_parquet_input(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["first document", "second one"], "n": [1, 2]}), tmp_path / "d.parquet")
    index = json.loads(tokenize_to_shards([str(tmp_path / "d.parquet")], tok, tmp_path / "out").read_text())
    assert index["documents"] == 2
    stream = np.fromfile(tmp_path / "out" / "00000.bin", dtype=np.uint16).tolist()
    assert stream == [t for d in ("first document", "second one")
                      for t in tok.encode(d, add_special_tokens=True) + [tok.eos_token_id]]


def test_bad_jsonl_names_file_and_line(tmp_path, tok):
    (tmp_path / "x.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(InputError, match=r"x.jsonl:2: no string field 'text'"):
        tokenize_to_shards([str(tmp_path / "x.jsonl")], tok, tmp_path / "out")


def test_cli_tokenize(tmp_path, shards):
    (tmp_path / "t.txt").write_text("Some text for the command line.")
    r = subprocess.run([sys.executable, "-m", "minicpm4.cli", "data", "tokenize", str(tmp_path / "t.txt"),
                        "--tokenizer", str(shards / "tokenizer"), "-o", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "1 documents" in r.stdout and (tmp_path / "o" / "index.json").is_file()


def test_loader_windows_cover_stream_once_per_epoch(shards):
    data = TokenShards(shards)
    loader = PackedLoader(data, seq_len=32, batch_size=4, seed=3)
    stream = np.concatenate([data.read(0, data.total)])
    seen = []
    for _ in range(loader.n_windows // 4):
        windows = loader.next_windows()
        seen += windows
    assert len(set(seen)) == len(seen)  # no window twice within the epoch
    loader = PackedLoader(data, seq_len=32, batch_size=4, seed=3)
    batch = loader.next_batch()
    w = loader._epoch_order()[:4].tolist()
    for row, i in enumerate(w):  # inputs and next-token labels are stream slices
        assert batch["input_ids"][row].tolist() == stream[i * 32:i * 32 + 32].tolist()
        assert batch["labels"][row].tolist() == stream[i * 32 + 1:i * 32 + 33].tolist()


def test_loader_is_seeded_and_resumes_exactly(shards):
    data = TokenShards(shards)
    run = lambda seed: [PackedLoader(data, 32, 4, seed).next_batch()["input_ids"] for _ in range(1)]  # noqa: E731
    assert torch.equal(run(1)[0], run(1)[0]) and not torch.equal(run(1)[0], run(2)[0])
    a = PackedLoader(data, 32, 4, seed=5)
    steps = a.n_windows // 4 + 3  # crosses into the second epoch
    for _ in range(steps - 2):
        a.next_batch()
    state = a.state_dict()
    tail = [a.next_batch()["input_ids"] for _ in range(4)]
    b = PackedLoader(data, 32, 4, seed=5)
    b.load_state_dict(state)
    assert all(torch.equal(x, b.next_batch()["input_ids"]) for x in tail)
    assert a.epoch == 1


def test_ranks_split_the_global_batch(shards):
    data = TokenShards(shards)
    whole = PackedLoader(data, 32, 4, seed=0).next_batch()["input_ids"]
    parts = [PackedLoader(data, 32, 4, seed=0, rank=r, world=2).next_batch()["input_ids"] for r in range(2)]
    assert torch.equal(torch.cat(parts), whole)


def test_decay_mix_draws_its_share_from_the_decay_corpus_only_in_the_decay_phase(tmp_path, shards, tok):
    from minicpm4.train.token_loader import DecayMix
    (tmp_path / "hq.txt").write_text("High quality text for the decay phase. " * 200)
    hq = TokenShards(tokenize_to_shards([str(tmp_path / "hq.txt")], tok, tmp_path / "hq").parent)
    hq_windows = {tuple(hq.read(i * 32, 33).tolist()) for i in range((hq.total - 1) // 32)}

    def mix(rank=0, world=1):
        main = PackedLoader(TokenShards(shards), 32, 4, seed=0, rank=rank, world=world)
        return DecayMix(main, PackedLoader(hq, 32, 4, seed=1, rank=rank, world=world), mix=0.5, decay_start=2)

    def from_hq(batch):
        x = torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1)
        return [tuple(r.tolist()) in hq_windows for r in x]

    m = mix()
    assert [from_hq(m.next_batch()) for _ in range(4)] == [[False] * 4] * 2 + [[False, False, True, True]] * 2
    state = m.state_dict()
    tail = [m.next_batch()["input_ids"] for _ in range(2)]
    again = mix()
    again.load_state_dict(state)
    assert all(torch.equal(x, again.next_batch()["input_ids"]) for x in tail)
    # two ranks split each global batch, in the decay phase too
    ranks, whole = [mix(r, 2) for r in range(2)], mix()
    for _ in range(3):
        assert torch.equal(torch.cat([r.next_batch()["input_ids"] for r in ranks]), whole.next_batch()["input_ids"])
