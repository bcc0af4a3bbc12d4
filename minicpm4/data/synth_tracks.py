"""The synthesis tracks: each turns one seed document into zero or more samples.

Pretraining rewrites (MiniCPM4 report, pp. 12-13) give `{"text"}` samples: `textbook` and `forum`.
UltraChat v2 tracks (§3.1) give `{"messages"}` samples in the OpenAI chat format:
- `knowledge`: question on a knowledge point -> instruction evolution -> answer -> answer-diversity
  evolution (two samples: one question, two differently structured answers);
- `math`: problem + step-by-step solution; self-check = an independent re-solve must reach the same
  final answer, else the sample is dropped (`self_check_disagree`);
- `code`: task + solution + assert tests; self-check = a review that must say pass, or, with
  run_tests, the tests are executed in a subprocess (no guard beyond a timeout: trusted endpoints only);
- `instruction`: rule-verifiable constraints layered 1..k onto a writing task; n candidates per level,
  only a candidate passing every rule is kept (`constraints.py`);
- `long_context`: a question on the seed, the seed planted at a random position among k documents
  retrieved from the other seeds (word overlap), answered over the whole context;
- `tool_use`: a request, a one-sentence reasoning (CoT before the call) and a call that must validate
  against the tool's JSON schema (`tool_calls.py`).
A track returns (samples, reasons) where reasons names every rejected candidate.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from dataclasses import dataclass, field

from minicpm4.children import wrap
from minicpm4.data import synth_prompts as P
from minicpm4.data.constraints import failures, layered
from minicpm4.data.synth_client import ChatClient
from minicpm4.data.tool_calls import validate_call

TRACKS = ("textbook", "forum", "knowledge", "math", "code", "instruction", "long_context", "tool_use")


@dataclass
class TrackContext:
    client: ChatClient
    pool: list[tuple[str, str]] = field(default_factory=list)  # (seed id, text) for long-context retrieval
    tools: list[dict] = field(default_factory=list)
    candidates: int = 4  # best-of-n for instruction following
    constraints: int = 3  # layers of constraints
    retrieved: int = 4  # documents around the planted one
    level: str = "high-school"
    run_tests: bool = False
    seed: int = 0


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _pair(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


async def textbook(ctx, seed_id, doc):
    text = (await ctx.client.chat(_user(P.TEXTBOOK.format(doc=doc)))).strip()
    return ([{"text": text, "track": "textbook"}], []) if text else ([], ["empty_reply"])


async def forum(ctx, seed_id, doc):
    text = (await ctx.client.chat(_user(P.FORUM.format(doc=doc)))).strip()
    return ([{"text": text, "track": "forum"}], []) if text else ([], ["empty_reply"])


async def knowledge(ctx, seed_id, doc):
    q = P.sections(await ctx.client.chat(_user(P.KNOWLEDGE_QUESTION.format(doc=doc)))).get("QUESTION")
    if not q:
        return [], ["no_question"]
    evolved = P.sections(await ctx.client.chat(_user(P.EVOLVE_INSTRUCTION.format(question=q)))).get("QUESTION") or q
    answer = (await ctx.client.chat(_user(evolved))).strip()
    if not answer:
        return [], ["empty_answer"]
    other = (await ctx.client.chat(_user(P.EVOLVE_ANSWER.format(question=evolved, answer=answer)))).strip()
    samples = [{"messages": _pair(evolved, a), "track": "knowledge"} for a in dict.fromkeys([answer, other]) if a]
    return samples, []


def _norm_answer(text: str) -> str:
    return re.sub(r"[\s$\\.,]|\\boxed|[{}]", "", text).lower()


async def math(ctx, seed_id, doc):
    s = P.sections(await ctx.client.chat(_user(P.MATH_PROBLEM.format(doc=doc, level=ctx.level))))
    if not all(s.get(k) for k in ("PROBLEM", "SOLUTION", "ANSWER")):
        return [], ["unparsed_problem"]
    check = P.sections(await ctx.client.chat(_user(P.SOLVE.format(problem=s["PROBLEM"])))).get("ANSWER", "")
    if _norm_answer(check) != _norm_answer(s["ANSWER"]):
        return [], ["self_check_disagree"]
    answer = f"{s['SOLUTION']}\n\nAnswer: {s['ANSWER']}"
    return [{"messages": _pair(s["PROBLEM"], answer), "track": "math"}], []


def run_python_tests(solution: str, tests: str, timeout: float = 10.0) -> bool:
    """Run solution + asserts in a fresh isolated interpreter; True if it exits 0 within the timeout."""
    try:
        # wrap: the timeout is ours to enforce, so a looping solution must not outlive us (children.py)
        done = subprocess.run(wrap([sys.executable, "-I", "-c", f"{solution}\n\n{tests}\n"]), capture_output=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


async def code(ctx, seed_id, doc):
    reply = await ctx.client.chat(_user(P.CODE_PROBLEM.format(doc=doc, level=ctx.level)))
    s = P.sections(reply)
    if not all(s.get(k) for k in ("PROBLEM", "SOLUTION", "TESTS")):
        return [], ["unparsed_problem"]
    solution, tests = P.code_block(s["SOLUTION"]), P.code_block(s["TESTS"])
    if ctx.run_tests:
        ok = run_python_tests(solution, tests)
    else:
        review = await ctx.client.chat(_user(P.CODE_REVIEW.format(problem=s["PROBLEM"], solution=solution,
                                                                  tests=tests)))
        ok = P.sections(review).get("VERDICT", "").lower().startswith("pass")
    if not ok:
        return [], ["self_check_fail"]
    answer = f"```python\n{solution}\n```\n\nTests:\n```python\n{tests}\n```"
    return [{"messages": _pair(s["PROBLEM"], answer), "track": "code"}], []


async def instruction(ctx, seed_id, doc):
    rng = random.Random(f"{ctx.seed}:{seed_id}")
    constraints = layered(rng, ctx.constraints)
    samples, reasons = [], []
    for level in range(1, len(constraints) + 1):
        active = constraints[:level]
        prompt = P.IF_TASK.format(doc=doc, constraints=" ".join(c.describe() for c in active))
        for _ in range(ctx.candidates):
            reply = (await ctx.client.chat(_user(prompt))).strip()
            broken = failures(reply, active)
            if not broken:
                samples.append({"messages": _pair(prompt, reply), "track": "instruction",
                                "constraints": [[c.kind, c.value] for c in active]})
                break
            reasons += [f"broke_{kind}" for kind in broken]
        else:
            reasons.append(f"no_compliant_candidate_level_{level}")
    return samples, reasons


def _overlap(a: set[str], b: set[str]) -> float:
    return len(a & b) / (len(a | b) or 1)


def retrieve(doc: str, pool: list[tuple[str, str]], seed_id: str, k: int) -> list[str]:
    """The k pool documents (not the seed itself) sharing the most words with `doc` (Jaccard)."""
    words = set(re.findall(r"\w+", doc.lower()))
    scored = [(_overlap(words, set(re.findall(r"\w+", text.lower()))), i, text)
              for i, (pid, text) in enumerate(pool) if pid != seed_id]
    return [text for _, _, text in sorted(scored, key=lambda t: (-t[0], t[1]))[:k]]


async def long_context(ctx, seed_id, doc):
    q = P.sections(await ctx.client.chat(_user(P.LONG_QUESTION.format(doc=doc)))).get("QUESTION")
    if not q:
        return [], ["no_question"]
    docs = retrieve(doc, ctx.pool, seed_id, ctx.retrieved)
    position = random.Random(f"{ctx.seed}:{seed_id}").randint(0, len(docs))
    docs.insert(position, doc)
    context = "\n\n".join(f"Document {i + 1}:\n{d}" for i, d in enumerate(docs))
    prompt = P.LONG_ANSWER.format(context=context, question=q)
    answer = (await ctx.client.chat(_user(prompt))).strip()
    if not answer:
        return [], ["empty_answer"]
    return [{"messages": _pair(prompt, answer), "track": "long_context", "position": position,
             "documents": len(docs)}], []


async def tool_use(ctx, seed_id, doc):
    tool = random.Random(f"{ctx.seed}:{seed_id}").choice(ctx.tools)
    topic = " ".join(doc.split()[:60])
    s = P.sections(await ctx.client.chat(_user(P.TOOL_CALL.format(tool=json.dumps(tool), topic=topic))))
    if not s.get("USER") or not s.get("CALL"):
        return [], ["unparsed_call"]
    try:
        call = json.loads(s["CALL"])
    except json.JSONDecodeError:
        return [], ["call_not_json"]
    reason = validate_call(call, ctx.tools) if isinstance(call, dict) else "call_not_object"
    if reason:
        return [], [reason.split(":")[0]]
    arguments = call["arguments"] if isinstance(call["arguments"], str) else json.dumps(call["arguments"])
    assistant = {"role": "assistant", "content": s.get("THOUGHT", ""),
                 "tool_calls": [{"id": "call_0", "type": "function",
                                 "function": {"name": call["name"], "arguments": arguments}}]}
    return [{"messages": [{"role": "user", "content": s["USER"]}, assistant], "tools": ctx.tools,
             "track": "tool_use"}], []


TRACK_FUNCTIONS = {name: globals()[name] for name in TRACKS}
