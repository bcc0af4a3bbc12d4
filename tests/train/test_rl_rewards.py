"""Verifiable rewards on crafted model outputs: right, wrong, malformed, garbage and malicious."""

import os
import socket

import pytest

from minicpm4.train.rl.code_reward import IOTest, code_reward
from minicpm4.train.rl.math_reward import answers_equal, math_reward, normalise
from minicpm4.train.rl.reward import extract_answer, extract_code, format_reward
from minicpm4.train.rl.sandbox import Limits, run_python

FAST = Limits(cpu_s=1, wall_s=10.0, memory_bytes=256 << 20)


def py(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```\n"


# ---- format ----

@pytest.mark.parametrize("text, kind, want", [
    ("So the answer is \\boxed{42}.", "math", 1.0),
    ("#### 17", "math", 1.0),
    ("The answer is 3/4.", "math", 1.0),
    ("I think it is 42", "math", 0.0),  # no final-answer marker
    ("\\boxed{42", "math", 0.0),  # unclosed box
    ("<think>hmm \\boxed{1}", "math", 0.0),  # unclosed think
    (py("print(1)"), "code", 1.0),
    ("```python\nprint(1)\n", "code", 0.0),  # fence never closed
    ("```rust\nfn main(){}\n```", "code", 0.0),
    ("", "any", 0.0), ("   \n", "any", 0.0), ("ab\ufffdc", "any", 0.0), (None, "any", 0.0), (b"bytes", "any", 0.0),
])
def test_format_reward(text, kind, want):
    r = format_reward(text, kind)
    assert r.value == want, r.reason


def test_format_reward_unknown_kind_is_a_zero_not_an_exception():
    r = format_reward("x", "poetry")
    assert r.value == 0 and "unknown format kind" in r.reason


def test_extraction():
    assert extract_answer("a \\boxed{1} then \\boxed{\\frac{1}{2}} end") == "\\frac{1}{2}"  # the last, nested braces
    assert extract_answer("Answer: 12 sheep.\nmore") == "12 sheep"
    assert extract_code("```python\na=1\n```\n```\nb=2\n```") == "b=2\n"


# ---- math ----

@pytest.mark.parametrize("answer, reference, equal", [
    ("42", "42", True), ("42.0", "42", True), ("1,000", "1000", True), ("0.5", "\\frac{1}{2}", True),
    ("\\dfrac{3}{4}", "0.75", True), ("x = 5", "5", True), ("50\\%", "50", True), ("12 \\text{ sheep}", "12", True),
    ("2\\sqrt{3}", "\\sqrt{12}", True),  # sympy
    ("\\frac{\\pi}{2}", "pi/2", True), ("x^2 + 2x + 1", "(x+1)^2", True),
    ("43", "42", False), ("\\sqrt{2}", "1.41421", False), ("x+1", "x-1", False),
])
def test_answers_equal(answer, reference, equal):
    got, how = answers_equal(answer, reference)
    assert got == equal, how


def test_math_reward_right_wrong_malformed():
    assert math_reward("3 and 4 make 7. \\boxed{7}", "7").value == 1.0
    assert math_reward("3 and 4 make 8. \\boxed{8}", "7").value == 0.0
    r = math_reward("3 and 4 make 7.", "7")  # right number, no final answer: format 0
    assert r.value == 0.0 and r.reason.startswith("format:")


@pytest.mark.parametrize("garbage", [
    "\\boxed{}", "\\boxed{{{{{{", "\\boxed{\\frac{1}}", "\\boxed{\\sqrt[3}", "\\boxed{)(*&^%$#@!}", "\x00\x01\x02",
    "\\boxed{" + "(" * 5000 + "}", "\\boxed{1/0}", "\\boxed{é漢字}", "The answer is ∞∞∞", 12345, None,
])
def test_math_reward_garbage_gives_zero(garbage):
    r = math_reward(garbage, "7")
    assert r.value == 0.0 and r.reason


def test_math_reward_never_evaluates_code(tmp_path):
    target = tmp_path / "pwned"
    for payload in (f"__import__('os').system('touch {target}')", "exec('1')", "x.__class__", "e.n(100000)"):
        with pytest.raises(ValueError):
            normalise(payload)
        assert math_reward(f"\\boxed{{{payload}}}", "7").value == 0.0
    assert not target.exists()


def test_math_reward_pathological_power_is_cut_off():
    # 9^(9^(9^9)) has about 10^369693099 digits: sympy would compute forever (or until memory runs out); the
    # worker is killed after timeout_s and the reward is 0
    r = math_reward("\\boxed{9^{9^{9^{9}}}}", "7", timeout_s=1.0)
    assert r.value == 0.0 and ("no answer within" in r.reason or "could not compare" in r.reason)
    assert math_reward("\\boxed{2\\sqrt{3}}", "\\sqrt{12}").value == 1.0  # a fresh worker answers the next call


# ---- code: honest programs ----

def test_code_reward_fraction_of_io_tests():
    tests = [IOTest("2 3\n", "5"), IOTest("10 -4\n", "6\n"), IOTest("1 1\n", "3")]  # the third expects a wrong sum
    r = code_reward(py("a, b = map(int, input().split())\nprint(a + b)"), tests, FAST)
    assert r.value == pytest.approx(2 / 3) and "2/3 tests passed; test 2: wrong output" in r.reason


def test_code_reward_assert_tests():
    code = py("def add(a, b):\n    return a + b")
    r = code_reward(code, ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 5"], FAST)
    assert r.value == pytest.approx(2 / 3) and "test 2: exit 1: AssertionError" in r.reason


def test_code_reward_malformed_and_garbage():
    assert code_reward("print(1)", [IOTest("", "1")], FAST).value == 0.0  # no code block
    assert code_reward(py("def f(:\n  pass"), [IOTest("", "")], FAST).value == 0.0  # syntax error
    assert code_reward(py("print(1)"), [], FAST).value == 0.0
    assert code_reward(None, [IOTest("", "1")], FAST).value == 0.0


# ---- code: malicious programs, killed by the limits ----

def test_infinite_loop_is_killed_by_the_cpu_limit():
    r = run_python("while True:\n    pass", limits=Limits(cpu_s=1, wall_s=60.0))
    assert not r.ok and r.signal in ("SIGXCPU", "SIGKILL") and not r.timed_out


def test_sleep_is_killed_by_the_wall_timeout():
    r = run_python("import time\ntime.sleep(60)", limits=Limits(wall_s=1.0))
    assert r.timed_out and r.describe() == "wall timeout"


def test_memory_bomb_fails_under_the_address_space_limit():
    bomb = "x = bytearray(2 << 30)\nprint('allocated')"  # 4 GiB against a 256 MiB limit
    r = run_python(bomb, limits=FAST)
    assert not r.ok and "MemoryError" in r.stderr and "allocated" not in r.stdout
    assert code_reward(py(bomb), [IOTest("", "allocated")], FAST).value == 0.0


def test_fork_is_refused():
    r = run_python("import os\nprint('child' if os.fork() == 0 else 'parent')", limits=FAST)
    assert r.isolation["fork_blocked"], r.isolation
    assert not r.ok and "BlockingIOError" in r.stderr and r.stdout == ""
    bomb = py("import os\nwhile True:\n    os.fork()")
    assert code_reward(bomb, [IOTest("", "")], FAST).value == 0.0


def test_network_is_cut_off():
    # a server in this process, on loopback: the program passes its test only if it can connect and read the banner
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    code = py(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=3)\nprint('connected')")
    try:
        r = code_reward(code, [IOTest("", "connected")], FAST)
    finally:
        srv.close()
    if os.geteuid() != 0 and "network NOT cut off" in r.reason:
        pytest.skip("this OS refuses network namespaces to unprivileged users: " + r.reason)
    assert r.value == 0.0 and "Network is unreachable" in r.reason, r.reason


def test_output_flood_is_cut_off():
    r = run_python("while True:\n    print('x' * 1000)", limits=Limits(output_bytes=1 << 16, wall_s=10.0))
    assert not r.ok and len(r.stdout) <= 1 << 16
