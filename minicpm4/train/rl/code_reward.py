"""The code reward: the fraction of tests the model's program passes (MiniCPM4 report §3.2), 0 if malformed.

    reward = 0                       no closed ```python block (reward.format_problem(., "code"))
    reward = passed / len(tests)     each test a separate sandboxed run (sandbox.py: CPU, memory, output and
                                     process limits, wall timeout, no network), so one test's crash or hang
                                     cannot affect another

Two kinds of test, as the report's sources use them:
- IOTest(stdin, expected) (Codeforces, TACO): the program reads stdin; it passes when its stdout equals `expected`
  up to whitespace (the same tokens in the same order), and it exits 0;
- a str (LeetCode, KodCode): Python code appended to the program, typically asserts; it passes when the run exits 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from minicpm4.train.rl.reward import Reward, extract_code, format_problem, never_raises
from minicpm4.train.rl.sandbox import Limits, RunResult, run_python


@dataclass(frozen=True)
class IOTest:
    stdin: str
    expected: str


def run_test(code: str, test: IOTest | str, limits: Limits) -> tuple[bool, RunResult]:
    if isinstance(test, IOTest):
        r = run_python(code, test.stdin, limits)
        return r.ok and r.stdout.split() == test.expected.split(), r
    r = run_python(code + "\n\n" + test + "\n", "", limits)
    return r.ok, r


@never_raises
def code_reward(completion: str, tests: Sequence[IOTest | str], limits: Limits = Limits()) -> Reward:
    """passed / len(tests) for the completion's last python block; the reason names the first failure."""
    problem = format_problem(completion, "code")
    if problem:
        return Reward(0.0, f"format: {problem}")
    if not tests:
        return Reward(0.0, "no tests given")
    code = extract_code(completion)
    passed, first_failure, isolation = 0, "", {}
    for i, test in enumerate(tests):
        ok, r = run_test(code, test, limits)
        passed += ok
        isolation = r.isolation or isolation
        if not ok and not first_failure:
            first_failure = f"; test {i}: {r.describe() if not r.ok else 'wrong output'}"
    net = "" if isolation.get("network_cut") else "; network NOT cut off"
    return Reward(passed / len(tests), f"{passed}/{len(tests)} tests passed{first_failure}{net}")
