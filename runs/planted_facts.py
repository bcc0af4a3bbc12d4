"""Planted-fact retrieval for runs/tiny_pipeline.sh: training documents (a share of the seq-128 pretraining, and
the long-context stage's data), held-out tests, and the retrieval score of a model.

A training document is KJV text (runs/kjv_corpus.py's books) with facts "The secret of Abner 4821." and passages of
12 random words planted in its first three quarters and, at its end, all of them again in a new order: the number
is an induction-style copy (the name is one token: find its earlier occurrence, copy what followed), and the
passages give the same copy more targets. Pretraining sees such documents of <= 128 tokens, so the copy exists at
short range before the long stage; the long stage's documents are up to 1024 tokens long.

    python runs/planted_facts.py data OUT --short [--tokens N]   OUT/short/train.jsonl (pretraining share)
    python runs/planted_facts.py data OUT [--tokens N]           OUT/long/{train,test,test_short}.jsonl
    python runs/planted_facts.py eval OUT NAME=MODEL_DIR ... [--tests test_short.jsonl] [--sparse JSON] [--dense]
                                      [--control] [--limit N]    -> OUT/long/retrieval[_short].json
    python runs/planted_facts.py probe SHARDS MODEL_DIR ...      the copy probe (below)

Training documents (train.jsonl, one JSON {"text"} per line, for `minicpm4 data tokenize`) come in length ranges
(SHARES: up to ~250, ~500, ~1000 tokens, the length buckets of the stage; SHORT_SHARES: up to 128), with one fact
per ~50 tokens. Tests use text from held-out books and new random numbers (nothing can be recalled from training,
only copied from the prompt): test.jsonl ~1000 tokens, 4 facts in the first half, then the question "The secret of
X" for one of them at the end, ~450 or more tokens after its fact (past the pretrained length); test_short.jsonl the
same in ~120 tokens with 2 facts (within it).

eval: one forward per test of prompt + answer (sparse_config switched on, as in the stage; --dense adds a dense
run). Greedy decoding gives the exact number iff the argmax after the prompt and after each of its tokens is the
next token, so `exact` is greedy exact-match accuracy from that one pass; `tokens` is the accuracy per token of the
number (" 4", "8", "21": a digit or a pair, as the BPE splits it) and `nll` its mean negative log-likelihood per
token. Chance: exact 1e-4, tokens <= 0.1. --control scores the same tests with the asked number replaced in the
prompt: a look-up falls to chance there, a prior over digits does not. `prompt_loss_by_position` is the mean
next-token loss over the prompts themselves at positions 1-127, 128-511 and 512 on: pretraining never saw a position
past 127.

probe: whether a model copies at all, with no facts: 16 rows of 20 tokens drawn from the SHARDS stream, then `gap`
(0, 60, 400) other stream tokens, then the same 20 again; the mean loss on the first and on the second copy. An
induction circuit takes most of the second copy's loss away; a model without one pays the same twice.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

# One BPE token each (the 4096-token KJV tokenizer): the name right before the number is the whole key, so the look-up
# is one induction step (find the earlier occurrence of this token, copy what followed it).
NAMES = ("Abner Asher Azariah Balaam Benaiah Caleb Eleazar Ephraim Esau Gideon Hezekiah Jehu Joab Jonathan Josiah "
         "Kohath Laban Levi Lot Merari Micah Mordecai Nathan Obed Reuben Shimei Sihon Zadok Zebulun Asaph").split()
# Training tokens per length range (bound, share): half in short documents, which run dense and ~5x cheaper, where
# the copy is learnt fastest; the longer ones teach it across distance, through InfLLM v2 past dense_len.
SHARES = ((256, 0.5), (512, 0.25), (1024, 0.25))
TOKENS_PER_FACT = 50  # a fact and its repeat take ~24 tokens: about half of a document is the task
PASSAGE_WORDS = 12  # random-word passages, repeated like the facts: every repeated token is a copy target
SHORT_SHARES = ((128, 1.0),)  # the pretraining share: the copy learnt within the pretrained length first
SHORT_REPEATS = 0.5  # share of the pretraining documents that are repeat_document()s
SHORT_TOKENS_PER_FACT = 35  # denser there: 2-3 facts and a passage per document, ~half of its tokens repeats
WORDS_PER_TOKEN = 0.75  # KJV words per token of the 4096-token BPE, about
TEST_BOOKS = 3  # the last books (of kjv_corpus.py's text/) give the tests' text


def question(name: str) -> str:
    return f"The secret of {name}"


def fact(name: str, number: int) -> str:
    return f"{question(name)} {number}."


def document(rng: random.Random, words: list[str], n_words: int, n_facts: int, names: list[str]) -> str:
    """n_words of text from a random place in `words` with n_facts facts and n_facts/2 passages of random words
    planted in the first 3/4, then all of them repeated in a shuffled order."""
    start = rng.randrange(len(words) - n_words)
    text = words[start:start + n_words]
    keys = rng.sample(names, n_facts)
    planted = [fact(key, rng.randrange(1000, 10000)) for key in keys]
    planted += [" ".join(rng.choices(words, k=PASSAGE_WORDS)) for _ in range(max(1, n_facts // 2))]
    spots = sorted(rng.randrange(n_words * 3 // 4) for _ in planted)
    for offset, (spot, item) in enumerate(zip(spots, rng.sample(planted, len(planted)))):
        text.insert(spot + offset, item)
    return " ".join(text + rng.sample(planted, len(planted)))


def repeat_document(rng: random.Random, words: list[str], n_words: int) -> str:
    """A span of random words said two or three times over n_words: after its first copy every token is a copy
    target that nothing but a look-up predicts, the plainest signal for an induction circuit."""
    times = rng.choice((2, 3))
    span = rng.choices(words, k=max(4, n_words // times))
    return " ".join(span * times)


def book_words(out: Path) -> tuple[list[str], list[str]]:
    """(training words, test words): kjv_corpus.py's books, the last TEST_BOOKS held out."""
    books = sorted((out / "text").glob("*.txt"))
    split = [" ".join(p.read_text().split()[:200000]) for p in books]
    return " ".join(split[:-TEST_BOOKS]).split(), " ".join(split[-TEST_BOOKS:]).split()


def make_train(out: Path, dest: Path, tokens: int, shares: tuple, per_fact: int, rng: random.Random,
               repeats: float = 0.0) -> None:
    """dest/train.jsonl: ~`tokens` tokens of planted-fact documents, `share` of them up to `bound` tokens long, one
    fact per `per_fact` tokens; a `repeats` share of the documents are repeated spans instead."""
    train_words, _ = book_words(out)
    dest.mkdir(parents=True, exist_ok=True)
    with open(dest / "train.jsonl", "w") as f:
        for bound, share in shares:
            made = 0
            while made < tokens * share:
                n_tok = rng.randrange(bound // 2, bound - bound // 8)
                n_facts = max(1, n_tok // per_fact)
                if repeats and rng.random() < repeats:  # (no draw without repeats: the long data stay as they were)
                    text = repeat_document(rng, train_words, int(n_tok * WORDS_PER_TOKEN))
                else:
                    text = document(rng, train_words, int((n_tok - 24 * n_facts) * WORDS_PER_TOKEN), n_facts, NAMES)
                f.write(json.dumps({"text": text}) + "\n")
                made += n_tok


def make_tests(out: Path, path: Path, n_tests: int, n_tok: int, n_facts: int, rng: random.Random) -> None:
    """Held-out tests of ~n_tok tokens: n_facts facts in the first half, then the question for one of them."""
    _, test_words = book_words(out)
    with open(path, "w") as f:
        for _ in range(n_tests):
            n_words = int((n_tok - 10 * n_facts) * WORDS_PER_TOKEN)
            start = rng.randrange(len(test_words) - n_words)
            text = test_words[start:start + n_words]
            keys = rng.sample(NAMES, n_facts)
            numbers = [rng.randrange(1000, 10000) for _ in keys]
            spots = sorted(rng.randrange(n_words // 2) for _ in keys)
            for offset, (spot, key, num) in enumerate(zip(spots, keys, numbers)):
                text.insert(spot + offset, fact(key, num))
            ask = rng.randrange(n_facts)
            prompt = " ".join(text) + " " + question(keys[ask])
            f.write(json.dumps({"prompt": prompt, "answer": f" {numbers[ask]}"}) + "\n")


def make_data(out: Path, tokens: int, n_tests: int, seed: int, short: bool, repeats: float = SHORT_REPEATS) -> None:
    """The long stage's data (OUT/long: train.jsonl, test.jsonl of ~1000-token prompts, test_short.jsonl of
    ~120-token ones), or with `short` the pretraining share (OUT/short/train.jsonl, documents of <= 128 tokens)."""
    rng = random.Random(seed)
    if short:
        make_train(out, out / "short", tokens, SHORT_SHARES, SHORT_TOKENS_PER_FACT, rng, repeats)
        return
    make_train(out, out / "long", tokens, SHARES, TOKENS_PER_FACT, rng)
    make_tests(out, out / "long" / "test.jsonl", n_tests, 1000, 4, rng)
    make_tests(out, out / "long" / "test_short.jsonl", n_tests, 120, 2, rng)


def encode_tests(tok, path: Path) -> list[tuple[list[int], int]]:
    """(ids of prompt + answer, number of answer tokens) per test; the answer is the last tokens."""
    tests = []
    for line in path.read_text().splitlines():
        t = json.loads(line)
        prompt = tok.encode(t["prompt"], add_special_tokens=True)
        full = tok.encode(t["prompt"] + t["answer"], add_special_tokens=True)
        assert full[:len(prompt)] == prompt, "the answer must tokenize apart from the prompt"
        tests.append((full, len(full) - len(prompt)))
    return tests


def score(model, tests: list[tuple[list[int], int]], batch: int = 4) -> dict:
    """Teacher-forced answer tokens: exact (all argmax right = greedy exact match), per-token accuracy, mean NLL."""
    import torch
    import torch.nn.functional as F
    torch.set_grad_enabled(False)
    exact = right = total = 0
    nll = 0.0
    ranges = ((1, 128), (128, 512), (512, 2048))  # text loss by position: where the pretrained length ends
    text_loss, text_count = [0.0] * len(ranges), [0] * len(ranges)
    for i in range(0, len(tests), batch):
        rows = tests[i:i + batch]
        width = max(len(ids) for ids, _ in rows) - 1
        x = torch.full((len(rows), width), 0, dtype=torch.int64)
        for r, (ids, _) in enumerate(rows):
            x[r, :len(ids) - 1] = torch.tensor(ids[:-1])  # padding after the row never reaches it (causal)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = model(x, hidden_only=True)
        for r, (ids, n) in enumerate(rows):
            m = len(ids) - 1 - n  # prompt positions predict prompt tokens (text and planted facts) up to here
            losses = F.cross_entropy(model.lm_head(h[r, :m - 1].float()), torch.tensor(ids[1:m]), reduction="none")
            for j, (a, b) in enumerate(ranges):
                text_loss[j] += float(losses[a - 1:b - 1].sum())
                text_count[j] += len(losses[a - 1:b - 1])
            at = torch.arange(len(ids) - 1 - n, len(ids) - 1)  # positions whose next token is an answer token
            logits = model.lm_head(h[r, at].float())
            target = torch.tensor(ids[-n:])
            ok = logits.argmax(-1) == target
            exact += bool(ok.all())
            right += int(ok.sum())
            total += n
            nll += float(F.cross_entropy(logits, target))
    by_position = {f"{a}-{b}": loss / max(count, 1) for (a, b), loss, count in zip(ranges, text_loss, text_count)}
    return {"exact": exact / len(tests), "tokens": right / total, "nll": nll / len(tests), "tests": len(tests),
            "prompt_loss_by_position": by_position}


def swap_numbers(path: Path, seed: int = 7) -> Path:
    """The control: the same tests with the asked fact's number replaced by another in the prompt, so the answer
    can only be guessed; a model that retrieves scores much lower here than on the real tests."""
    rng = random.Random(seed)
    dest = path.with_name(path.stem.replace("test", "control") + ".jsonl")
    with open(dest, "w") as f:
        for line in path.read_text().splitlines():
            t = json.loads(line)
            other = f" {rng.randrange(1000, 10000)}."  # the text has no digits: only the fact has " NNNN."
            f.write(json.dumps({**t, "prompt": t["prompt"].replace(f"{t['answer']}.", other)}) + "\n")
    return dest


def evaluate(out: Path, models: list[str], sparse: dict, dense: bool, limit: int = 0, control: bool = False,
             tests_name: str = "test.jsonl") -> dict:
    import dataclasses
    import os

    import minicpm4
    from minicpm4.model.decoder import dense_attention
    from minicpm4.sparse.attention import make_backend
    results = {}
    for item in models:
        name, _, path = item.partition("=")
        model, tok = minicpm4.load(path, dtype="fp32")
        tests = encode_tests(tok, out / "long" / tests_name)[:limit or None]
        sets = {"": tests}
        if control:
            sets[", no fact"] = encode_tests(tok, swap_numbers(out / "long" / tests_name))[:limit or None]
        runs = {"sparse": sparse, **({"dense": None} if dense else {})}
        for mode, setting in runs.items():
            model.config = dataclasses.replace(model.config, sparse_config=setting)
            model.set_attention_backend(dense_attention if setting is None else make_backend(setting))
            for tag, chosen in sets.items():
                results[f"{name} ({mode}{tag})"] = r = score(model.eval(), chosen)
                print(f"{name:>12} {mode + tag:<16} exact {r['exact']:.3f}  tokens {r['tokens']:.3f}  "
                      f"nll {r['nll']:.3f}  prompt loss by position {r['prompt_loss_by_position']}", flush=True)
    lengths = [len(ids) for ids, _ in tests]
    report = {"results": results, "sparse_config": sparse, "prompt_tokens": [min(lengths), max(lengths)],
              "load_avg": os.getloadavg()}
    dest = out / "long" / tests_name.replace("test", "retrieval").replace(".jsonl", ".json")
    dest.write_text(json.dumps(report, indent=1) + "\n")
    return report


def probe(shards: str, models: list[str]) -> None:
    import numpy as np
    import torch
    import torch.nn.functional as F

    import minicpm4
    from minicpm4.train.token_loader import TokenShards
    s = TokenShards(shards)
    stream = torch.from_numpy(s.read(0, min(s.total, 1_000_000)).astype(np.int64))
    for path in models:
        model, g, cells = minicpm4.load(path, dtype="fp32")[0].eval(), torch.Generator().manual_seed(0), []
        for gap in (0, 60, 400):
            span = stream[torch.randint(0, len(stream), (16, 20), generator=g)]
            filler = stream[torch.randint(0, len(stream), (16, gap), generator=g)]
            ids = torch.cat([torch.ones(16, 1, dtype=torch.long), span, filler, span], 1)  # [16, 41 + gap], BOS 1
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(ids[:, :-1]).float().transpose(1, 2), ids[:, 1:], reduction="none")
            cells.append(f"gap {gap}: 1st {loss[:, :20].mean():.2f} 2nd {loss[:, -19:].mean():.2f}")
        print(path, " | ".join(cells), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data")
    d.add_argument("out")
    d.add_argument("--tokens", type=int, default=3_000_000, help="training tokens to generate, about")
    d.add_argument("--tests", type=int, default=100)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--short", action="store_true", help="the pretraining share (OUT/short/train.jsonl) instead")
    d.add_argument("--repeats", type=float, default=SHORT_REPEATS, help="--short: share of repeat documents")
    e = sub.add_parser("eval")
    e.add_argument("out")
    e.add_argument("models", nargs="+", help="NAME=MODEL_DIR")
    e.add_argument("--sparse", default='{"dense_len": 256, "block_size": 32, "kernel_size": 16, '
                   '"kernel_stride": 8, "window_size": 128, "topk": 8}', help="sparse_config used at eval (JSON)")
    e.add_argument("--dense", action="store_true", help="also evaluate with dense attention")
    e.add_argument("--limit", type=int, default=0, help="score only the first N tests (0: all)")
    e.add_argument("--control", action="store_true", help="also score the tests with the fact's number swapped")
    e.add_argument("--tests", default="test.jsonl", help="test file in OUT/long (test_short.jsonl: ~120 tokens)")
    p = sub.add_parser("probe")
    p.add_argument("shards", help="a token index (its stream gives the spans)")
    p.add_argument("models", nargs="+", help="MODEL_DIR")
    for sp in (e, p):
        sp.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if a.cmd == "data":
        make_data(Path(a.out), a.tokens, a.tests, a.seed, a.short, a.repeats)
        return
    import torch
    torch.set_num_threads(a.threads)
    if a.cmd == "probe":
        probe(a.shards, a.models)
    else:
        print(json.dumps(evaluate(Path(a.out), a.models, json.loads(a.sparse), a.dense, a.limit, a.control,
                                  a.tests)["results"]))


if __name__ == "__main__":
    sys.exit(main())
