"""The console script end to end on the default model: generate, chat (stdin), info, convert."""

import subprocess
import sys

import torch

import minicpm4

CLI = [sys.executable, "-c", "from minicpm4.cli import main; main()"]


def run(*args, stdin=None):
    r = subprocess.run(CLI + list(args), capture_output=True, text=True, input=stdin, timeout=600)
    assert r.returncode == 0, r.stderr
    return r


def test_generate_answers_and_reports_speed(smollm_gguf):
    r = run("generate", "--model", str(smollm_gguf), "--prompt", "What is the capital of France?",
            "--max-new-tokens", "20")
    assert "Paris" in r.stdout
    assert "tok/s decode" not in r.stdout and "tok/s" in r.stderr


def test_generate_with_an_int8_kv_cache(smollm_gguf):
    r = run("generate", "--model", str(smollm_gguf), "--prompt", "What is the capital of France?",
            "--max-new-tokens", "20", "--kv-cache-dtype", "int8")
    assert "Paris" in r.stdout
    bad = subprocess.run(CLI + ["generate", "--prompt", "hi", "--kv-cache-dtype", "fp8"], capture_output=True,
                         text=True, timeout=600)
    assert bad.returncode == 2 and "'fp8' is not one of 'auto', 'int8'" in bad.stderr


def test_chat_keeps_history_and_exits_on_eof(smollm_gguf):
    r = run("chat", "--model", str(smollm_gguf), "--max-new-tokens", "24",
            stdin="My name is Alice.\n/reset\nWhat is 2+2?\n")
    assert r.stdout.count("> ") == 4  # three inputs read, then EOF at the fourth prompt
    assert "4" in r.stdout.split("> ")[3]
    assert r.stderr.count("[prompt ") == 2  # one speed line per reply; /reset is not a turn


def test_chat_reuses_the_conversation_between_turns(smollm_gguf):
    """The prefix cache, on by default: the second turn reuses all of the first turn's prompt; with
    --no-prefix-cache nothing is reused."""
    system = "You answer questions about foxes. " + "The quick brown fox jumps over the lazy dog. " * 60
    turns = "Name a colour.\nName an animal.\n"
    r = run("chat", "--model", str(smollm_gguf), "--max-new-tokens", "8", "--system", system, stdin=turns)
    lines = [line for line in r.stderr.splitlines() if line.startswith("[prompt ")]
    first = int(lines[0].split()[1])
    assert len(lines) == 2 and "cached" not in lines[0] and f", {first} cached," in lines[1]
    r = run("chat", "--model", str(smollm_gguf), "--max-new-tokens", "8", "--system", system, "--no-prefix-cache",
            stdin=turns)
    assert r.stderr.count("[prompt ") == 2 and "cached" not in r.stderr


def test_chat_says_when_a_message_exceeds_the_context_and_goes_on(smollm_gguf):
    long = "The quick brown fox jumps over the lazy dog. " * 30  # ~330 tokens
    r = run("chat", "--model", str(smollm_gguf), "--max-new-tokens", "8", "--max-model-len", "128",
            stdin=long + "\nWhat is 2+2?\n")
    assert "does not fit the context of 128 tokens" in r.stderr
    assert r.stderr.count("[prompt ") == 1  # the short question is still answered


def test_info_prints_shapes(smollm_gguf):
    r = run("info", str(smollm_gguf), "--dtype", "fp32")
    assert "134,515,008" in r.stdout and "9 / 3 (group 3)" in r.stdout and "torch.float32" in r.stdout


def test_convert_gguf_to_hf_dir_gives_same_logits(smollm_gguf, tmp_path):
    out = tmp_path / "hf"
    run("convert", str(smollm_gguf), str(out), "--dtype", "fp32")
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                              "tokenizer_config.json"}
    a, tok = minicpm4.load(smollm_gguf, dtype="fp32")
    b, tok_b = minicpm4.load(out, dtype="fp32")
    ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog.")])
    assert torch.equal(a(ids), b(ids))
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs) == tok_b.apply_chat_template(msgs)
    r = subprocess.run(CLI + ["convert", str(smollm_gguf), str(out)], capture_output=True, text=True)
    assert r.returncode == 2 and "output directory exists and is not empty" in r.stderr
