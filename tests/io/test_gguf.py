"""read_gguf: config, weights and errors, checked against transformers' own GGUF loader and against small
GGUF files written here with gguf.GGUFWriter (where the expected HF weights are known exactly)."""

import math

import gguf
import numpy as np
import pytest
import torch

from minicpm4.errors import CheckpointError
from minicpm4.io.gguf import read_gguf


@pytest.fixture(scope="module")
def checkpoint(smollm_checkpoint):
    return smollm_checkpoint


@pytest.fixture(scope="module")
def hf_reference(smollm_gguf, checkpoint):
    """transformers' parsed config and its dequantized, un-permuted tensors for the same file (one parse).
    A meta-device model only supplies the parameter names transformers maps GGUF names to; its GGUF
    model loader needs accelerate, which the project does not depend on."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**checkpoint.config))
    parsed = load_gguf_checkpoint(str(smollm_gguf), return_tensors=True, model_to_load=model)
    return parsed["config"], parsed["tensors"]


def test_config_matches_transformers(checkpoint, hf_reference):
    hf_config, _ = hf_reference
    config = checkpoint.config
    assert config["model_type"] == "llama"
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id", "rope_theta"):
        assert config[key] == hf_config[key], key
    assert config["rms_norm_eps"] == 1e-5  # the float32 9.99999974e-06, given back as the decimal it came from
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (30, 9, 3)
    assert config["tie_word_embeddings"] is True and "rope_scaling" not in config


def test_state_dict_matches_transformers(checkpoint, hf_reference):
    _, hf_tensors = hf_reference
    ours = checkpoint.state_dict
    # transformers ties lm_head to the embedding and does not load it; we do not emit it at all.
    assert set(ours) == set(hf_tensors) and "lm_head.weight" not in ours
    assert len(ours) == 2 + 30 * 9
    for name, tensor in ours.items():
        reference = hf_tensors[name]
        assert tensor.dtype == torch.float32 and tensor.shape == reference.shape, name
        assert torch.equal(tensor, reference) or (tensor - reference).abs().max().item() <= 1e-6, name
    assert ours["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576)
    assert ours["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert ours["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)


def test_tokenizer_config_from_metadata(checkpoint):
    cfg = checkpoint.tokenizer_config
    assert (cfg["bos_token"], cfg["eos_token"], cfg["unk_token"], cfg["pad_token"]) == (
        "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_end|>")
    assert cfg["add_bos_token"] is False and "<|im_start|>" in cfg["chat_template"]
    assert checkpoint.tokenizer.get_vocab_size() == 49152


# ---- small GGUF files written here -------------------------------------------------------------------

HIDDEN, N_HEAD, N_KV, HEAD_DIM, FFN, VOCAB, LAYERS = 32, 4, 2, 8, 48, 40, 2


def _llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to HF q/k rows (LlamaModel.permute)."""
    rows, cols = weight.shape
    return weight.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _hf_weights(tied: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,)}
    if not tied:
        shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
                   p + "self_attn.q_proj.weight": (N_HEAD * HEAD_DIM, HIDDEN),
                   p + "self_attn.k_proj.weight": (N_KV * HEAD_DIM, HIDDEN),
                   p + "self_attn.v_proj.weight": (N_KV * HEAD_DIM, HIDDEN),
                   p + "self_attn.o_proj.weight": (HIDDEN, N_HEAD * HEAD_DIM),
                   p + "mlp.gate_proj.weight": (FFN, HIDDEN), p + "mlp.up_proj.weight": (FFN, HIDDEN),
                   p + "mlp.down_proj.weight": (HIDDEN, FFN)}
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


_TO_GGUF = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
            "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down"}


def _gguf_name(hf_name: str) -> str:
    if hf_name in _TO_GGUF:
        return _TO_GGUF[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_TO_GGUF[rest.removesuffix('.weight')]}.weight"


def _write_gguf(path, arch="llama", tied=True, extra=None, tensors=None, metadata=None, merges=("a b",)):
    """A tiny model in llama.cpp's layout: q/k permuted, up_proj quantized to Q8_0, v_proj in F16."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_KV)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b", "ab"] + [f"t{i}" for i in range(3, VOCAB)])
    writer.add_token_merges(list(merges))
    for key, value in (metadata or {}).items():
        writer.add_float32(key, value)
    expected = {}
    for name, weight in (tensors if tensors is not None else _hf_weights(tied)).items():
        stored = weight
        if "q_proj" in name or "k_proj" in name:
            stored = _llama_cpp_permute(weight, N_HEAD if "q_proj" in name else N_KV)
        if "up_proj" in name:
            quantized = gguf.quants.quantize(stored, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(_gguf_name(name), quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            weight = gguf.quants.dequantize(quantized, gguf.GGMLQuantizationType.Q8_0)
        elif "v_proj" in name:
            writer.add_tensor(_gguf_name(name), stored.astype(np.float16))
            weight = stored.astype(np.float16).astype(np.float32)
        else:
            writer.add_tensor(_gguf_name(name), stored)
        expected[name] = weight
    for name, array in (extra or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def test_small_llama_weights_are_unpermuted_exactly(tmp_path):
    expected = _write_gguf(tmp_path / "tiny.gguf")
    ckpt = read_gguf(tmp_path / "tiny.gguf")
    assert set(ckpt.state_dict) == set(expected)
    for name, weight in expected.items():
        assert torch.equal(ckpt.state_dict[name], torch.from_numpy(weight)), name
    assert ckpt.config["tie_word_embeddings"] is True and ckpt.config["head_dim"] == HEAD_DIM
    assert ckpt.config["rms_norm_eps"] == 1e-6 and ckpt.config["vocab_size"] == VOCAB


def test_dtype_is_applied(tmp_path):
    expected = _write_gguf(tmp_path / "tiny.gguf")
    ckpt = read_gguf(str(tmp_path / "tiny.gguf"), dtype=torch.bfloat16)
    assert {t.dtype for t in ckpt.state_dict.values()} == {torch.bfloat16}
    name = "model.layers.1.self_attn.k_proj.weight"
    assert torch.equal(ckpt.state_dict[name], torch.from_numpy(expected[name]).to(torch.bfloat16))


def test_minicpm_scales_rope_factors_and_untied_head(tmp_path):
    layers, scale_depth, dim_model_base, half = LAYERS, 1.4, 16, HEAD_DIM // 2
    long_factor = np.linspace(1.0, 2.0, half, dtype=np.float32)
    short_factor = np.linspace(1.0, 1.5, half, dtype=np.float32)
    metadata = {"minicpm.embedding_scale": 12.0, "minicpm.residual_scale": scale_depth / math.sqrt(layers),
                "minicpm.logit_scale": HIDDEN / dim_model_base}
    extra = {"rope_factors_long.weight": long_factor, "rope_factors_short.weight": short_factor}
    expected = _write_gguf(tmp_path / "minicpm.gguf", arch="minicpm", tied=False, extra=extra, metadata=metadata)
    ckpt = read_gguf(tmp_path / "minicpm.gguf")
    config = ckpt.config
    assert config["model_type"] == "minicpm" and config["architectures"] == ["MiniCPMForCausalLM"]
    assert (config["scale_emb"], config["scale_depth"], config["dim_model_base"]) == (12.0, 1.4, 16)
    assert config["tie_word_embeddings"] is False
    assert torch.equal(ckpt.state_dict["lm_head.weight"], torch.from_numpy(expected["lm_head.weight"]))
    scaling = config["rope_scaling"]
    assert scaling["rope_type"] == "longrope" and scaling["original_max_position_embeddings"] == 256
    np.testing.assert_allclose(scaling["long_factor"], long_factor, rtol=1e-7)
    np.testing.assert_allclose(scaling["short_factor"], short_factor, rtol=1e-7)
    assert not any("rope_factors" in name for name in ckpt.state_dict)


def test_minicpm_without_scales_is_rejected(tmp_path):
    _write_gguf(tmp_path / "minicpm.gguf", arch="minicpm")
    with pytest.raises(CheckpointError, match=r"minicpm\.embedding_scale"):
        read_gguf(tmp_path / "minicpm.gguf")


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"model\.gguf: GGUF architecture 'qwen2' is not supported"):
        read_gguf(path)


def test_unknown_tensor_is_an_error_not_dropped(tmp_path):
    _write_gguf(tmp_path / "bias.gguf", extra={"blk.0.attn_q.bias": np.zeros(N_HEAD * HEAD_DIM, np.float32)})
    with pytest.raises(CheckpointError, match=r"bias\.gguf: unexpected tensor 'blk\.0\.attn_q\.bias'"):
        read_gguf(tmp_path / "bias.gguf")


def test_unsupported_tensor_type(tmp_path):
    weights = _hf_weights(tied=True)
    weights["model.norm.weight"] = weights["model.norm.weight"].astype(np.int32)  # I32: no dequantizer
    _write_gguf(tmp_path / "int.gguf", tensors=weights)
    with pytest.raises(CheckpointError, match=r"int\.gguf: tensor 'output_norm\.weight' uses quantization type I32"):
        read_gguf(tmp_path / "int.gguf")


def test_inconsistent_tokenizer_metadata(tmp_path):
    _write_gguf(tmp_path / "vocab.gguf", merges=("x y",))  # merges tokens that are not in the vocabulary
    with pytest.raises(CheckpointError, match=r"vocab\.gguf: inconsistent tokenizer metadata .*`x` out of vocabulary"):
        read_gguf(tmp_path / "vocab.gguf")


def test_head_count_that_does_not_divide_q_rows(tmp_path):
    weights = _hf_weights(tied=True)
    q_rows_short = weights.pop("model.layers.0.self_attn.q_proj.weight")[:-4]  # 28 rows: not 4 heads of 2*k
    _write_gguf(tmp_path / "heads.gguf", tensors=weights, extra={"blk.0.attn_q.weight": q_rows_short})
    with pytest.raises(CheckpointError, match=r"heads\.gguf: tensor 'blk\.0\.attn_q\.weight' .* 4 heads"):
        read_gguf(tmp_path / "heads.gguf")


def test_truncated_file(tmp_path, smollm_gguf):
    path = tmp_path / "cut.gguf"
    with open(smollm_gguf, "rb") as src, open(path, "wb") as dst:
        dst.write(src.read(1 << 20))
    with pytest.raises(CheckpointError, match=r"cut\.gguf: truncated or corrupt GGUF file"):
        read_gguf(path)


def test_tensor_data_cut_short(tmp_path):
    _write_gguf(tmp_path / "full.gguf")
    data = (tmp_path / "full.gguf").read_bytes()
    (tmp_path / "short.gguf").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"short\.gguf: truncated or corrupt"):
        read_gguf(tmp_path / "short.gguf")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "llama"}')
    with pytest.raises(CheckpointError, match=r"config\.json: not a GGUF file"):
        read_gguf(path)
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.gguf: not a GGUF file"):
        read_gguf(tmp_path / "empty.gguf")


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.gguf: cannot open file"):
        read_gguf(tmp_path / "nope.gguf")
    with pytest.raises(CheckpointError, match="cannot open file"):
        read_gguf(tmp_path)

