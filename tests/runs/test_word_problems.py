"""runs/word_problems.py: the scored answer is a worked reasoning line whose arithmetic is right, the wrong choices
differ from it only in the result, and no bench question occurs in the training problems."""

import re
import subprocess
import sys
from pathlib import Path

from minicpm4.train.scaling_bench import read_items

RUNS = Path(__file__).resolve().parents[2] / "runs"
OPS = {"and": lambda n, m: n + m, "less": lambda n, m: n - m, "times": lambda n, m: n * m}
WORKED = re.compile(r"^(\d+) (and|less|times) (\d+) (?:make|is) (\d+)\. So (?:\w+ had )?(\d+) ")


def result_of(line: str) -> tuple[int, int]:
    """(the result the reasoning line states, the result its operands give); the answer sentence repeats it."""
    n, op, m, stated, again = WORKED.match(line).groups()
    assert again == stated
    return int(stated), OPS[op](int(n), int(m))


def test_items_and_training_problems(tmp_path):
    subprocess.run([sys.executable, str(RUNS / "word_problems.py"), str(tmp_path), "--train", "300", "--bench", "60"],
                   check=True)
    items = read_items(tmp_path / "bench_reasoning.jsonl")  # the format `minicpm4 tunnel --bench` takes
    train = (tmp_path / "problems" / "train.txt").read_text().splitlines()
    assert len(items) == 60 and len(train) == 300
    questions = {line.split("?")[0] + "?" for line in train}
    for item in items:
        assert item["question"] not in questions
        stated, true = result_of(item["answer"])
        assert stated == true
        assert len(set(item["choices"])) == 4
        for j, choice in enumerate(item["choices"]):
            stated, true = result_of(choice)
            assert (stated == true) == (j == item["label"])
            assert re.sub(r"\d+", "N", choice) == re.sub(r"\d+", "N", item["answer"])  # only the numbers differ
    for line in train:
        stated, true = result_of(line.split("? ", 1)[1])
        assert stated == true
