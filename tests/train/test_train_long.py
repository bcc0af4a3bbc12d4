"""The long-context stage: length-bucketed batches (one document per row, similar lengths, deterministic,
resumable, split over ranks), LongRoPE factors and their effect on the rotary angles, its config checks, and a
resumed run through InfLLM v2 + LongRoPE + buckets on the loss curve of an uninterrupted one."""

import math

import numpy as np
import pytest
import torch
from train_util import TINY_MODEL, make_shards, small_tokenizer, tiny_config

from minicpm4.config import ModelConfig
from minicpm4.errors import CheckpointError, ConfigError
from minicpm4.model.decoder import MiniCPM4ForCausalLM, RotaryEmbedding
from minicpm4.train.length_buckets import BucketLoader
from minicpm4.train.linear_cross_entropy import IGNORE
from minicpm4.train.longrope import extend_rope, longrope_factors
from minicpm4.train.metrics import read_metrics
from minicpm4.train.token_loader import TokenShards
from minicpm4.train.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")
SPARSE = {"dense_len": 64, "block_size": 16, "kernel_size": 8, "kernel_stride": 4, "window_size": 32, "topk": 2}


@pytest.fixture(scope="module")
def shards(tmp_path_factory, real_text):
    return make_shards(tmp_path_factory.mktemp("long"), real_text, small_tokenizer(real_text))


def batches(loader, n):
    return [loader.next_batch() for _ in range(n)]


def test_rows_hold_one_document_each_and_a_batch_one_bucket(shards):
    data = TokenShards(shards)
    eos = data.index["eos_token_id"]
    loader = BucketLoader(data, 64, 2, [16, 32, 64], seed=0)
    n_batches = len(loader._epoch_batches())
    seen = []
    for b in batches(loader, n_batches):
        x, y = b["input_ids"], b["labels"]
        real = y != IGNORE
        lengths = real.sum(1)
        bound = next(u for u in (16, 32, 64) if int(lengths.max()) <= u)
        assert x.shape[0] == 2 * 64 // bound  # token budget: batch_size * seq_len / bound rows
        assert int(lengths.min()) > bound // 2 or bound == 16  # every row in the same bucket
        assert bool((real[:, :-1] | ~real[:, 1:]).all())  # real targets first, padding after
        for row in range(x.shape[0]):
            n = int(lengths[row])
            assert eos not in x[row, 1:n].tolist()  # no row runs across a document end
            assert torch.equal(y[row, :n - 1], x[row, 1:n])
            seen.append((tuple(x[row, :n].tolist()), int(y[row, n - 1])))
    assert loader.epoch == 1 and loader.position == 0
    assert len(set(seen)) == len(seen)  # no piece twice in an epoch


def test_buckets_pad_less_than_one_bucket(shards):
    """The same pieces padded per bucket waste fewer tokens than padded to seq_len in a single bucket (about half
    here: half the text is one long document, cut into full pieces that need no padding either way)."""
    def padding(bounds):
        loader = BucketLoader(TokenShards(shards), 64, 2, bounds, seed=0)
        got = batches(loader, len(loader._epoch_batches()))
        return sum(int((b["labels"] == IGNORE).sum()) for b in got) / sum(b["labels"].numel() for b in got)
    assert padding([16, 32, 64]) < 0.6 * padding([64])


def test_order_is_seeded_resumable_and_split_over_ranks(shards):
    data = TokenShards(shards)
    a = BucketLoader(data, 64, 2, [16, 32, 64], seed=3)
    first = batches(a, 5)
    state = a.state_dict()
    rest = batches(a, 4)
    b = BucketLoader(data, 64, 2, [16, 32, 64], seed=3)
    b.load_state_dict(state)
    for x, y in zip(rest, batches(b, 4)):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
    other = batches(BucketLoader(data, 64, 2, [16, 32, 64], seed=4), 5)
    assert any(x["input_ids"].shape != y["input_ids"].shape or not torch.equal(x["input_ids"], y["input_ids"])
               for x, y in zip(first, other))
    ranks = [batches(BucketLoader(data, 64, 2, [16, 32, 64], seed=3, rank=r, world=2), 5) for r in (0, 1)]
    for whole, r0, r1 in zip(first, *ranks):
        assert torch.equal(torch.cat([r0["input_ids"], r1["input_ids"]]), whole["input_ids"])
    with pytest.raises(CheckpointError, match="bounds"):
        BucketLoader(data, 64, 2, [32, 64], seed=3).load_state_dict(state)


@pytest.mark.parametrize("bounds, message", [
    ([16, 32], r"must end at seq_len \(64\)"),
    ([24, 64], r"must divide seq_len \(64\)"),
    ([32, 16, 64], "must be increasing"),
])
def test_bad_buckets_are_rejected(shards, tmp_path, bounds, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(shards, tmp_path, seq_len=64, length_buckets=bounds)


def test_longrope_factors_keep_fast_dims_and_stretch_slow_ones():
    f = longrope_factors(16, 10000.0, 128, 2048)  # wavelengths 6.3, 19.9, 62.8, 199, ...
    assert f[0] == 1.0 and f[1] == 1.0  # >= 4 turns within 128 positions
    assert f[3:] == [16.0] * 5  # less than one turn
    assert 1.0 < f[2] < 16.0 and f == sorted(f)


def test_extend_rope_interpolates_slow_dims():
    """After extend_rope, a fully stretched dimension at position 16p turns through the angle it had at p; a
    kept dimension keeps its angle; cos and sin carry LongRoPE's attention factor."""
    mc = ModelConfig.from_dict({**ModelConfig(**{**TINY_MODEL, "vocab_size": 64}).to_dict(),
                                "max_position_embeddings": 2048})
    model = MiniCPM4ForCausalLM(mc)
    before = RotaryEmbedding(mc)
    extend_rope(model, 128)
    assert model.config.rope_scaling["original_max_position_embeddings"] == 128
    p = torch.arange(0, 100)[None]
    cos0, _ = before(p, 100)
    cos1, _ = model.model.rotary_emb(p * 16, 1600)
    factor = math.sqrt(1 + math.log(16) / math.log(128))
    half = mc.head_dim // 2
    slow = [i for i, x in enumerate(model.config.rope_scaling["long_factor"]) if x == 16.0]
    assert torch.allclose(cos1[0, :, 0, slow] / factor, cos0[0, :, 0, slow], atol=1e-4)
    cos2, _ = model.model.rotary_emb(p, 100)
    assert torch.allclose(cos2[0, :, 0, 0] / factor, cos0[0, :, 0, 0], atol=1e-5)
    assert half == len(model.config.rope_scaling["long_factor"])
    with pytest.raises(ConfigError, match="already has rope_scaling"):
        extend_rope(model, 128)


def test_long_context_checks_fail_before_compute(shards, tmp_path):
    cfg = tiny_config(shards, tmp_path / "a", seq_len=128, longrope_from=512)
    with pytest.raises(ConfigError, match=r"longrope_from \(512\) must be below the model's max_position_embed"):
        train(cfg)
    cfg = tiny_config(shards, tmp_path / "b", seq_len=128, longrope_from=128)
    with pytest.raises(ConfigError, match=r"seq_len \(128\) <= longrope_from \(128\)"):
        train(cfg)
    with pytest.raises(ConfigError, match="length_buckets are for pretraining"):
        tiny_config(shards, tmp_path / "c", seq_len=64, length_buckets=[32, 64], task="sft")
    assert not any((tmp_path / d / "metrics.jsonl").exists() for d in "ab")


def test_long_stage_resumes_on_the_same_curve(shards, tmp_path):
    """Buckets + LongRoPE + InfLLM v2 (seq 128 > dense_len 64): 4 steps straight equal 2 steps, a stop and a
    resume, and the checkpoint keeps the long-context settings."""
    import minicpm4
    kw = dict(seq_len=128, batch_size=2, micro_batch_size=2, steps=4, warmup_steps=1, decay_steps=1, lr=0.02,
              length_buckets=[32, 64, 128], longrope_from=32, model_overrides=dict(TINY_MODEL, sparse_config=SPARSE))
    train(tiny_config(shards, tmp_path / "a", **kw))
    train(tiny_config(shards, tmp_path / "b", **kw), stop_after=2)
    result = train(tiny_config(shards, tmp_path / "b", **kw), resume=str(tmp_path / "b"))
    a, b = ([r["loss"] for r in read_metrics(tmp_path / x / "metrics.jsonl")] for x in "ab")
    assert len(a) == 4 and np.allclose(a, b, atol=1e-6, rtol=0)
    model, _ = minicpm4.load(result["checkpoint"] / "model", dtype="fp32")
    assert model.config.sparse_config["dense_len"] == 64
    assert model.config.rope_scaling["original_max_position_embeddings"] == 32
