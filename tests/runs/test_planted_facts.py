"""runs/planted_facts.py's data: every planted fact is repeated at the document's end, tests ask one fact planted
in their first half, and the control removes exactly the asked number from the prompt."""

import importlib.util
import json
import random
import re
from pathlib import Path

import pytest

RUNS = Path(__file__).resolve().parents[2] / "runs"


@pytest.fixture(scope="module")
def pf():
    spec = importlib.util.spec_from_file_location("planted_facts", RUNS / "planted_facts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def out(tmp_path):
    rng = random.Random(3)
    vocab = "and the of he said unto them LORD house king went came people land".split()
    (tmp_path / "text").mkdir()
    for i in range(5):  # the last TEST_BOOKS (3) are held out for the tests
        (tmp_path / "text" / f"1_{i:02d}.txt").write_text(" ".join(rng.choices(vocab, k=3000)))
    return tmp_path


FACT = re.compile(r"The secret of (\w+) (\d{4})\.")


def test_document_repeats_each_fact_after_its_first_occurrence(pf):
    rng = random.Random(0)
    words = [f"w{i}" for i in range(5000)]  # the planted passages draw from these too
    text = pf.document(rng, words, 300, 4, pf.NAMES)
    facts = FACT.findall(text)
    assert len(facts) == 8 and len(set(facts)) == 4  # 4 facts, each twice
    assert len({name for name, _ in facts}) == 4  # distinct keys: the name alone finds the number
    tail = text[text.index(f"{facts[3][1]}.") + 6:]  # after the 4th fact of the text: the repeats start later
    body = text[:len(text) - len(tail)]
    for name, number in set(facts):
        assert text.count(f"The secret of {name} {number}.") == 2
        assert f"{name} {number}." in body and f"{name} {number}." in tail


def test_short_share_and_tests(pf, out):
    pf.make_data(out, 20000, 12, seed=1, short=True)
    docs = [json.loads(line)["text"] for line in (out / "short" / "train.jsonl").read_text().splitlines()]
    assert docs and all(len(d.split()) < 128 for d in docs)  # words < tokens: within the pretrained length
    repeats = 0
    for d in docs:
        words = d.split()
        if FACT.findall(d):  # a planted-fact document: each fact twice
            assert all(d.count(f"The secret of {n} {v}.") == 2 for n, v in FACT.findall(d))
        else:  # a repeat document: one span said 2 or 3 times
            assert any(len(words) % k == 0 and words == words[:len(words) // k] * k for k in (2, 3))
            repeats += 1
    assert 0.3 < repeats / len(docs) < 0.7  # SHORT_REPEATS = 0.5
    pf.make_data(out, 20000, 12, seed=1, short=False)
    tests = [json.loads(line) for line in (out / "long" / "test.jsonl").read_text().splitlines()]
    assert len(tests) == 12
    for t in tests:
        name = re.search(r"The secret of (\w+)$", t["prompt"]).group(1)
        planted = dict(FACT.findall(t["prompt"]))
        assert len(planted) == 4 and planted[name] == t["answer"].strip()
        at = t["prompt"].index(f"{name} {planted[name]}.")
        assert at < len(t["prompt"]) // 2 + 200  # in the first half: far from the question
    control = [json.loads(line) for line in pf.swap_numbers(out / "long" / "test.jsonl").read_text().splitlines()]
    for t, c in zip(tests, control):
        name = re.search(r"The secret of (\w+)$", t["prompt"]).group(1)
        assert t["answer"].strip() not in c["prompt"] and c["answer"] == t["answer"]
        assert dict(FACT.findall(c["prompt"])).keys() == dict(FACT.findall(t["prompt"])).keys()
        assert dict(FACT.findall(c["prompt"]))[name] != t["answer"].strip()
