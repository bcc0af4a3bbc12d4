"""Packed ternary checkpoints (minicpm4/quant/ternary_format.py): round trip through `load`, clear errors for corrupt or
mismatched files, and `minicpm4 quantize --method ternary` + `generate` through the CLI."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import minicpm4
from minicpm4.config import tiny
from minicpm4.errors import CheckpointError
from minicpm4.model.decoder import MiniCPM4ForCausalLM
from minicpm4.quant.ternary import TernaryLinear
from minicpm4.quant.ternary_format import save_ternary, ternarize
from minicpm4.text.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tiny_model():
    from minicpm4.io.loader import default_model_dir
    tok = Tokenizer.from_dir(default_model_dir())
    torch.manual_seed(0)
    cfg = tiny()
    cfg.vocab_size = tok.vocab_size
    return MiniCPM4ForCausalLM(cfg).eval(), tok


@pytest.fixture(scope="module")
def saved(tiny_model, tmp_path_factory):
    model, tok = tiny_model
    return save_ternary(model, tok, tmp_path_factory.mktemp("ternary") / "out")


def test_round_trip_loads_packed_layers_that_compute_the_ternary_model(tiny_model, saved):
    model, _ = tiny_model
    cfg = json.loads((saved / "config.json").read_text())["quantization_config"]
    assert cfg == {"quant_method": "minicpm4_ternary", "bits": 2, "group_size": 32, "format_version": 1}
    loaded, _ = minicpm4.load(saved, dtype="fp32")
    expected = ternarize(model)
    assert set(expected) == {n for n, m in loaded.named_modules() if isinstance(m, TernaryLinear)}
    for name, ref in expected.items():
        got = loaded.get_submodule(name)
        assert torch.equal(got.planes, ref.planes) and torch.equal(got.qscale, ref.qscale)
        assert torch.equal(got.dscale, ref.dscale), name  # bf16 in the file, exactly
    # reference: the float model with each linear weight replaced by the packed layer's dequantized weight
    ref_model = MiniCPM4ForCausalLM(model.config).eval()
    ref_model.load_state_dict(model.state_dict())
    for name, layer in expected.items():
        ref_model.get_submodule(name).weight.data = layer.dequantize()
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for n in (40, 1):  # prefill (unpack + bf16 GEMM) and a decode-sized input (gemv kernel)
            a, b = loaded(ids[:, :n]).float(), ref_model(ids[:, :n]).float()
            assert ((a - b).abs().max() / b.abs().max()) < 0.03, n


def test_file_is_small(tiny_model, saved):
    model, _ = tiny_model
    tensors = load_file(saved / "model.safetensors")
    packed = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.rpartition(".")[2] in
                 ("planes", "qscale", "dscale"))
    bf16 = sum(model.get_submodule(name).weight.numel() * 2 for name in ternarize(model))
    assert packed / bf16 <= 0.15


def _corrupt(saved, tmp_path, edit_tensors=None, edit_config=None):
    out = tmp_path / "bad"
    out.mkdir()
    for f in saved.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    if edit_tensors:
        t = load_file(out / "model.safetensors")
        edit_tensors(t)
        save_file(t, out / "model.safetensors", metadata={"format": "pt"})
    if edit_config:
        cfg = json.loads((out / "config.json").read_text())
        edit_config(cfg["quantization_config"])
        (out / "config.json").write_text(json.dumps(cfg))
    return out


LAYER = "model.layers.0.mlp.down_proj"


@pytest.mark.parametrize("edit_tensors,edit_config,match", [
    (None, lambda q: q.update(group_size=64), "group_size=64 bits=2; packed ternary checkpoints use group_size 32"),
    (None, lambda q: q.update(format_version=9), "format_version 9 is not supported"),
    (lambda t: t.pop(f"{LAYER}.qscale"), None, f"tensor {LAYER}.qscale missing"),
    (lambda t: t.pop(f"{LAYER}.dscale"), None, f"tensor {LAYER}.dscale missing"),
    (lambda t: t.update({f"{LAYER}.qscale": t[f"{LAYER}.qscale"][:, :2].contiguous()}), None,
     f"tensor {LAYER}.qscale must be uint8"),
    (lambda t: t.update({f"{LAYER}.planes": t[f"{LAYER}.planes"] | 1}), None, "both \\+1 and -1"),
    (lambda t: t.update({f"{LAYER}.planes": t[f"{LAYER}.planes"].float()}), None, f"{LAYER}.planes must be int32"),
    # packed with the wrong input width for this config: 4 groups (128 inputs) where down_proj has 256
    (lambda t: t.update({f"{LAYER}.planes": t[f"{LAYER}.planes"][:, :4].contiguous(),
                         f"{LAYER}.qscale": t[f"{LAYER}.qscale"][:, :4].contiguous()}), None,
     f"tensor {LAYER}.weight has shape \\(128, 128\\), config implies \\(128, 256\\)"),
])
def test_corrupt_or_mismatched_checkpoint_gives_a_clear_error(saved, tmp_path, edit_tensors, edit_config, match):
    bad = _corrupt(saved, tmp_path, edit_tensors, edit_config)
    with pytest.raises(CheckpointError, match=match):
        minicpm4.load(bad)


def test_cli_quantize_ternary_then_generate(tiny_model, tmp_path):
    model, tok = tiny_model
    src = tmp_path / "float"
    from minicpm4.io.loader import save_pretrained
    save_pretrained(model, tok, src)
    out = tmp_path / "tern"
    run = [sys.executable, "-m", "minicpm4.cli"]
    r = subprocess.run(run + ["quantize", str(src), "--method", "ternary", "-o", str(out)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(run + ["generate", "--model", str(out), "--prompt", "Hello", "--max-new-tokens", "5",
                              "--temperature", "0"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    loaded, _ = minicpm4.load(out)
    assert isinstance(loaded.model.layers[1].self_attn.o_proj, TernaryLinear)
