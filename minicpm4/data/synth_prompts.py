"""Prompt templates for synthesis. Replies are parsed by their `MARKER:` lines (see `sections`)."""

from __future__ import annotations

import re

TEXTBOOK = """Rewrite the document below as a short textbook section for a student.
Structure: the key knowledge points; an explanation of each, in several rounds that build on each other;
a summary; then two practice questions with worked answers. Remove noise and fill logical gaps.
Reply with the section only.

DOCUMENT:
{doc}"""

FORUM = """Rewrite the document below as a forum thread in which users discuss its subject: a question,
several replies that answer, challenge and refine each other (include one disagreement and how it is
settled), each reply starting with "User N:". Keep the facts correct. Reply with the thread only.

DOCUMENT:
{doc}"""

KNOWLEDGE_QUESTION = """Pick one knowledge point taught by the document below and write one exam-style question
about it that can be answered without seeing the document.
Reply as:
QUESTION: <the question>

DOCUMENT:
{doc}"""

EVOLVE_INSTRUCTION = """Rewrite this question so that answering it needs deeper reasoning (add a condition,
ask for a comparison or an explanation of why), keeping it self-contained and answerable.
Reply as:
QUESTION: <the rewritten question>

ORIGINAL: {question}"""

EVOLVE_ANSWER = """Here is a question and an answer. Write a different correct answer: another structure
(step by step, or with a worked example, or a comparison table in text). Reply with the answer only.

QUESTION: {question}
ANSWER: {answer}"""

MATH_PROBLEM = """Write one {level} math problem inspired by the topic of the document below, then solve it
step by step, checking each step. Finish with the final result on its own line.
Reply as:
PROBLEM: <the problem>
SOLUTION: <the step-by-step solution>
ANSWER: <the final result only>

DOCUMENT:
{doc}"""

SOLVE = """Solve this problem step by step, then give the final result on its own line as
ANSWER: <the final result only>

{problem}"""

CODE_PROBLEM = """Write one {level} Python programming task inspired by the document below: a problem
statement, a solution function, and unit tests as plain `assert` statements that call it.
Reply as:
PROBLEM: <the task>
SOLUTION:
```python
<the function>
```
TESTS:
```python
<assert statements>
```

DOCUMENT:
{doc}"""

CODE_REVIEW = """Check whether this solution passes every test. Trace each assert.
Finish with VERDICT: pass or VERDICT: fail

PROBLEM: {problem}
SOLUTION:
```python
{solution}
```
TESTS:
```python
{tests}
```"""

IF_TASK = """Write about the subject of the following text for a general reader.

TEXT:
{doc}

{constraints}"""

LONG_QUESTION = """Write one question that can only be answered from the document below (extraction,
summary, reasoning or fact lookup). Reply as:
QUESTION: <the question>

DOCUMENT:
{doc}"""

LONG_ANSWER = """{context}

Answer using the documents above: {question}"""

TOOL_CALL = """You write training data for tool use. Tool available:
{tool}

Write a realistic user request, related to this topic if you can: {topic}
that needs this tool, a one-sentence reasoning, and the call with concrete arguments.
Reply as:
USER: <the request>
THOUGHT: <why and how to call the tool>
CALL: {{"name": "<tool name>", "arguments": {{...}}}}"""

_MARKER = re.compile(r"^([A-Z]{3,12}):[ \t]*", re.MULTILINE)


def sections(reply: str) -> dict[str, str]:
    """{"QUESTION": "...", ...} from lines starting with an upper-case marker and a colon."""
    parts = _MARKER.split(reply)
    return {parts[i]: parts[i + 1].strip() for i in range(1, len(parts) - 1, 2)}


def code_block(text: str) -> str:
    """The body of the first ``` fenced block, or the text itself."""
    m = re.search(r"```(?:python)?\n(.*?)```", text, re.DOTALL)
    return (m.group(1) if m else text).strip()
