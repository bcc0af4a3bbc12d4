"""Bad input gets a clear error that names the file, field or value, never a raw torch traceback."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minicpm4
from minicpm4.config import ModelConfig, preset
from minicpm4.errors import CheckpointError, ConfigError
from minicpm4.io.loader import save_pretrained


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm_gguf):
    """A real HF directory: the tiny preset with random weights and the default model's tokenizer."""
    _, tok = minicpm4.load(smollm_gguf, dtype="fp32")
    cfg = preset("tiny")
    cfg.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    model = minicpm4.MiniCPM4ForCausalLM(cfg)
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_pretrained(model, tok, out)
    return out


def copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_round_trip_loads_the_same_weights(tiny_dir):
    model, tok = minicpm4.load(tiny_dir, dtype="fp32")
    again, _ = minicpm4.load(tiny_dir, dtype="fp32")
    ids = torch.tensor([tok.encode("Hello world")])
    assert torch.equal(model(ids), again(ids))
    assert json.loads((tiny_dir / "config.json").read_text())["scale_emb"] == 12


def test_missing_config_json(tmp_path, tiny_dir):
    d = copy_dir(tiny_dir, tmp_path / "m")
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json not found"):
        minicpm4.load(d)


def test_truncated_safetensors(tmp_path, tiny_dir):
    d = copy_dir(tiny_dir, tmp_path / "m")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read safetensors file"):
        minicpm4.load(d)


def test_garbage_safetensors(tmp_path, tiny_dir):
    d = copy_dir(tiny_dir, tmp_path / "m")
    (d / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        minicpm4.load(d)


def test_tensor_with_wrong_shape(tmp_path, tiny_dir):
    d = copy_dir(tiny_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 320
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"mlp\.\w+_proj\.weight has shape .* config\.json implies"):
        minicpm4.load(d)


def test_missing_shard_in_index(tmp_path, tiny_dir):
    d = copy_dir(tiny_dir, tmp_path / "m")
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors",
                            "lm_head.weight": "model-00002-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="shard.* missing: model-00002-of-00002.safetensors"):
        minicpm4.load(d)


def test_sharded_checkpoint_loads(tmp_path, tiny_dir):
    from safetensors.torch import load_file, save_file
    d = copy_dir(tiny_dir, tmp_path / "m")
    state = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, keys in shards.items():
        save_file({k: state[k] for k in keys}, d / fname)
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    model, tok = minicpm4.load(d, dtype="fp32")
    ref, _ = minicpm4.load(tiny_dir, dtype="fp32")
    ids = torch.tensor([tok.encode("sharded")])
    assert torch.equal(model(ids), ref(ids))


def test_unknown_model_type_and_bad_shapes():
    with pytest.raises(ConfigError, match="model_type 'qwen2' is not supported"):
        ModelConfig.from_dict({"model_type": "qwen2"})
    with pytest.raises(ConfigError, match=r"num_attention_heads \(9\) is not a multiple of num_key_value_heads \(2\)"):
        ModelConfig.from_dict({"model_type": "minicpm", "hidden_size": 576, "num_attention_heads": 9,
                               "num_key_value_heads": 2})
    with pytest.raises(ConfigError, match="hidden_size must be a positive integer"):
        ModelConfig.from_dict({"model_type": "minicpm", "hidden_size": -4})
    with pytest.raises(ConfigError, match="long_factor must be a list of head_dim/2 = 32"):
        ModelConfig.from_dict({"model_type": "minicpm", "hidden_size": 1024, "num_attention_heads": 16,
                               "rope_scaling": {"rope_type": "longrope", "long_factor": [1.0] * 3,
                                                "short_factor": [1.0] * 32, "original_max_position_embeddings": 4}})


def test_config_defaults_and_llama_special_case():
    c = ModelConfig.from_dict({"model_type": "minicpm"})
    assert (c.scale_emb, c.dim_model_base, c.scale_depth, c.tie_word_embeddings) == (1, 1, 1, True)
    llama = ModelConfig.from_dict({"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30,
                                   "num_attention_heads": 9, "num_key_value_heads": 3})
    assert llama.scale_emb == 1 and llama.residual_scale == 1.0 and llama.logit_scale == 1.0
    assert llama.head_dim == 64
    m = preset("minicpm4-0.5b")
    assert math.isclose(m.residual_scale, 1.4 / math.sqrt(24)) and m.logit_scale == 4
    assert preset("minicpm4-8b").num_attention_heads // preset("minicpm4-8b").num_key_value_heads == 16


def test_config_round_trips_unknown_keys():
    d = {"model_type": "minicpm", "hidden_size": 64, "num_attention_heads": 4, "eos_token_id": [2, 73440],
         "initializer_range": 0.1, "sparse_config": {"topk": 32}}
    c = ModelConfig.from_dict(d)
    assert c.eos_token_ids == [2, 73440] and c.sparse_config["topk"] == 32 and c.sparse_config["block_size"] == 64
    assert ModelConfig.from_dict(c.to_dict()).to_dict() == c.to_dict()
    assert c.to_dict()["initializer_range"] == 0.1


def test_missing_path_and_fp16_on_cpu(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or directory"):
        minicpm4.load(tmp_path / "nope")
    with pytest.raises(ConfigError, match="float16 on CPU"):
        minicpm4.load(tmp_path, dtype="fp16")


def test_cli_prints_one_clean_line_for_bad_input(tmp_path):
    cli = [sys.executable, "-c", "from minicpm4.cli import main; main()"]
    r = subprocess.run(cli + ["generate", "--model", str(tmp_path), "--prompt", "hi"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == f"error: {tmp_path}: config.json not found (is this a Hugging Face model directory?)"
    assert "Traceback" not in r.stderr
    r = subprocess.run(cli + ["generate", "--prompt", "hi", "--top-p", "0"], capture_output=True, text=True)
    assert r.returncode == 2 and "invalid sampling parameter top_p=0.0" in r.stderr and "Traceback" not in r.stderr
