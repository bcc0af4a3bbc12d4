"""`minicpm4 frspec` and `minicpm4 generate --draft --frspec` end to end on the default model."""

import subprocess
import sys

import minicpm4
from minicpm4.engine.sampling import SamplingParams
from minicpm4.serve.llm import LLM
from minicpm4.spec.eagle import EagleDraft
from minicpm4.spec.frspec import load_vocab

CLI = [sys.executable, "-c", "from minicpm4.cli import main; main()"]


def run(*args):
    r = subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return r


def test_frspec_and_speculative_generate_match_plain_greedy(real_text, tmp_path):
    """The default model from its cached HF directory (loads in a fraction of the GGUF's time)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(real_text)
    freq = tmp_path / "freq.pt"
    run("frspec", "--corpus", corpus, "--size", 2000, "-o", freq)
    model, tok = minicpm4.load("default", dtype="fp32")
    ids = load_vocab(freq, model.config.vocab_size)
    llm = LLM(model, tok)
    assert ids.numel() == 2000 and set(llm.stop_token_ids) <= set(ids.tolist())
    assert tok.encode(" the")[0] in ids[:50].tolist()  # among the most frequent English tokens

    draft = EagleDraft.for_target(model).save(tmp_path / "draft")  # untrained: verification decides anyway
    prompt = "The license grants"
    plain = llm.generate([prompt], SamplingParams(max_new_tokens=12, ignore_eos=True))[0].text
    r = run("generate", "--dtype", "fp32", "--raw", "--prompt", prompt,
            "--max-new-tokens", 12, "--draft", draft, "--frspec", freq, "--spec", '{"topk": 4, "tree_size": 6}')
    assert "mean acceptance" in r.stderr
    # the CLI stops at EOS, the in-process run ignores it: compare up to the CLI's end
    assert r.stdout.rstrip("\n") and plain.startswith(r.stdout.rstrip("\n"))


def test_train_draft_is_registered():
    r = run("train", "draft", "--help")
    assert "--frspec" in r.stdout and "--max-windows" in r.stdout
