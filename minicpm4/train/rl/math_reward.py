"""The math reward: 1 when the final answer equals the reference, else 0 (MiniCPM4 report §3.2: rules + SymPy).

    reward = 0   the output is malformed (reward.format_problem(., "math"): no \\boxed{} or answer line, ...)
    reward = 1   the extracted answer equals the reference:
                   1. the same string after normalisation (LaTeX -> plain expression, below), or
                   2. both are exact rationals (12, -0.5, 3/4, 1,000) and equal as fractions, or
                   3. sympy: simplify(a - b) == 0, or |N(a - b)| < 1e-9 when both are numbers
    reward = 0   otherwise, or when sympy needs more than `timeout_s` (then the worker is killed)

Normalisation: drops $, \\left, \\right, spacing commands, \\text{...} and \\mathrm{...} (units), degree signs and
%; \\frac{a}{b} -> ((a)/(b)), \\sqrt{a} -> sqrt(a), \\sqrt[n]{a} -> (a)**(1/(n)), \\pi -> pi, \\cdot and \\times ->
*, ^ -> **, braces -> parentheses, thousands commas removed; "x = 5" -> "5". What remains must use digits,
+-*/^().,  spaces and the names in NAMES (single letters are symbols), else the answer is unsupported (reward 0):
that whitelist is what keeps sympy's parse_expr, which calls eval, from running code a model wrote.

sympy runs in a separate worker process (started once, reused) with a 1 GiB address-space limit, so an answer like
9^{9^{9^{9}}} can neither hang the trainer nor exhaust its memory: past timeout_s the worker is killed and
restarted for the next call.
"""

from __future__ import annotations

import json
import re
import select
import subprocess
import sys
import threading
from fractions import Fraction

from minicpm4.train.rl.reward import Reward, extract_answer, format_problem, never_raises

NAMES = {"sqrt", "pi", "e", "i", "oo", "infty", "log", "ln", "exp", "sin", "cos", "tan"}
_DROP = [r"\$", r"\\left", r"\\right", r"\\[,;:! ]", r"\\displaystyle", r"\^\{?\\circ\}?", r"\\%", "%", r"\\degree",
         r"\\(?:text|mathrm|textbf|mbox)\{[^{}]*\}"]
_RATIONAL = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)(/\d+)?$")


def _braced(s: str, i: int) -> tuple[str, int]:
    """The content of the {...} group opening at s[i], and the index after it (ValueError if unbalanced)."""
    if i >= len(s) or s[i] != "{":
        raise ValueError("expected {")
    depth = 0
    for j in range(i, len(s)):
        depth += {"{": 1, "}": -1}.get(s[j], 0)
        if depth == 0:
            return s[i + 1:j], j + 1
    raise ValueError("unbalanced braces")


def _latex_to_plain(s: str) -> str:
    out, i = [], 0
    while i < len(s):
        if s.startswith(("\\frac", "\\dfrac", "\\tfrac"), i):
            i = s.index("frac", i) + 4
            num, i = _braced(s, i)
            den, i = _braced(s, i)
            out.append(f"(({_latex_to_plain(num)})/({_latex_to_plain(den)}))")
        elif s.startswith("\\sqrt", i):
            i += 5
            if i < len(s) and s[i] == "[":
                close = s.index("]", i)
                root, i = s[i + 1:close], close + 1
                arg, i = _braced(s, i)
                out.append(f"(({_latex_to_plain(arg)})**(1/({_latex_to_plain(root)})))")
            else:
                arg, i = _braced(s, i)
                out.append(f"sqrt({_latex_to_plain(arg)})")
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def normalise(answer: str) -> str:
    """A LaTeX-ish final answer -> a plain expression string (see the module docstring); ValueError if unsupported."""
    s = answer.strip()
    for pattern in _DROP:
        s = re.sub(pattern, "", s)
    s = _latex_to_plain(s)
    for a, b in (("\\cdot", "*"), ("\\times", "*"), ("\\div", "/"), ("\\pi", "pi"), ("\\infty", "oo"),
                 ("\\ln", "ln"), ("\\log", "log"), ("\\exp", "exp"), ("\\sin", "sin"), ("\\cos", "cos"),
                 ("\\tan", "tan"), ("^", "**"), ("{", "("), ("}", ")")):
        s = s.replace(a, b)
    s = re.sub(r"(?<=\d),(?=\d{3}(\D|$))", "", s)  # 1,000,000 -> 1000000
    if "=" in s:  # "x = 5" -> "5"
        lhs, _, s = s.rpartition("=")
        if not re.fullmatch(r"\s*[A-Za-z]?\s*", lhs):
            raise ValueError(f"unsupported equation {answer!r}")
    s = re.sub(r"\s+", "", s).rstrip(".")
    if not s or not re.fullmatch(r"[0-9A-Za-z+\-*/().]*", s):
        raise ValueError(f"unsupported characters in {answer!r}")
    if re.search(r"\.(?=[A-Za-z(])|(?<=[A-Za-z)])\.", s):  # a dot outside a number: attribute access
        raise ValueError(f"unsupported '.' in {answer!r}")
    for name in re.findall(r"[A-Za-z]+", s):
        if len(name) > 1 and name not in NAMES:
            raise ValueError(f"unsupported name {name!r} in {answer!r}")
    return s


def rational(s: str) -> Fraction | None:
    """An exact rational for "12", "-0.5", "3/4", "((1)/(2))" (parentheses around the parts are dropped)."""
    s = s.replace("(", "").replace(")", "")
    if not _RATIONAL.match(s):
        return None
    num, _, den = s.partition("/")
    if den and Fraction(den) == 0:
        return None  # 1/0: left to sympy (zoo), never a ZeroDivisionError
    return Fraction(num) / (Fraction(den) if den else 1)


# ---- the sympy worker: one process, JSON lines in and out ----

_WORKER = r"""
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
from sympy import E, I, N, oo, pi, simplify
from sympy.parsing.sympy_parser import (convert_xor, implicit_multiplication_application, parse_expr,
                                        standard_transformations)
T = standard_transformations + (implicit_multiplication_application, convert_xor)
NAMES = {"e": E, "i": I, "pi": pi, "oo": oo, "infty": oo}
print("ready", flush=True)
for line in sys.stdin:
    a, b = json.loads(line)
    try:
        x, y = (parse_expr(s, local_dict=dict(NAMES), transformations=T, evaluate=True) for s in (a, b))
        d = simplify(x - y)
        eq = d == 0 or (d.is_number and bool(abs(N(d)) < 1e-9))
        print(json.dumps({"equal": bool(eq)}), flush=True)
    except BaseException as e:
        print(json.dumps({"error": type(e).__name__ + ": " + str(e)[:200]}), flush=True)
"""


class SympyWorker:
    """A long-lived sympy process; equal(a, b) answers within timeout_s or kills it (restarted on next use)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.lock = threading.Lock()

    def _start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-I", "-c", _WORKER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        if self._readline(60.0) != "ready":
            self.close()
            raise RuntimeError("the sympy worker did not start")

    def _readline(self, timeout_s: float) -> str | None:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        return self.proc.stdout.readline().strip() if ready else None

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def equal(self, a: str, b: str, timeout_s: float) -> tuple[bool, str]:
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self._start()
            self.proc.stdin.write(json.dumps([a, b]) + "\n")
            self.proc.stdin.flush()
            line = self._readline(timeout_s)
            if not line:  # timed out, or the worker died (memory limit)
                self.close()
                return False, f"sympy gave no answer within {timeout_s} s (worker killed)"
            out = json.loads(line)
            if "error" in out:
                return False, f"sympy could not compare: {out['error']}"
            return out["equal"], "equal (sympy)" if out["equal"] else "not equal (sympy)"


_sympy = SympyWorker()


def answers_equal(answer: str, reference: str, timeout_s: float = 2.0) -> tuple[bool, str]:
    """(equal, how it was decided) for two final answers (LaTeX or plain)."""
    try:
        a, b = normalise(answer), normalise(reference)
    except ValueError as e:
        return False, str(e)
    if a == b:
        return True, "equal (same normalised string)"
    ra, rb = rational(a), rational(b)
    if ra is not None and rb is not None:
        return ra == rb, "equal (rationals)" if ra == rb else f"not equal ({a} != {b})"
    return _sympy.equal(a, b, timeout_s)


@never_raises
def math_reward(completion: str, reference: str, timeout_s: float = 2.0) -> Reward:
    """1 if the completion's final answer equals `reference`, else 0; 0 for malformed output."""
    problem = format_problem(completion, "math")
    if problem:
        return Reward(0.0, f"format: {problem}")
    answer = extract_answer(completion)
    equal, how = answers_equal(answer, str(reference), timeout_s)
    return Reward(1.0 if equal else 0.0, f"{answer!r}: {how}")
