"""LLM-judge prompts and the parsing of their one-word answers.

Entailment (AutoSurvey's NLI check, asked of an LLM): is the claim supported by the premise passages? The
answer's first "yes" or "no" counts; a reply with neither is recorded as unparsed (None) and treated as not
supported, so a judge that cannot answer never makes a claim look supported.

Survey scores (SurveyEval, LLMxMapReduce-V2): relevance, coverage, depth and novelty, each 1-5 against a
rubric, one request per criterion; the first digit 1-5 of the reply is the score, else None.
"""

from __future__ import annotations

import re

ENTAIL_SYSTEM = "You check whether a claim is supported by source passages. Answer with one word: Yes or No."
ENTAIL_USER = """Premise (source passages):
{premise}

Claim:
{claim}

Is the claim supported by the premise? Answer Yes or No."""

CRITERIA = {
    "relevance": "How well the survey stays on the topic: 1 = mostly off-topic, 3 = on topic with digressions, "
                 "5 = every part serves the topic.",
    "coverage": "How much of the topic's important ground the survey covers: 1 = one narrow aspect, "
                "3 = the main aspects but with gaps, 5 = comprehensive.",
    "depth": "How deeply the survey explains, compares and analyses: 1 = lists facts, 3 = some explanation, "
             "5 = insightful analysis of how and why.",
    "novelty": "How far the survey goes beyond restating sources: 1 = restates, 3 = some synthesis or "
               "perspective, 5 = original organisation and insight.",
}
SCORE_SYSTEM = "You are an expert reviewer of survey articles. Answer with a single integer from 1 to 5."
SCORE_USER = """Topic: {topic}

Survey:
{survey}

Criterion - {name}: {rubric}

Score the survey on this criterion from 1 to 5. Answer with the number only."""


def entailment_messages(premise: str, claim: str) -> list[dict]:
    return [{"role": "system", "content": ENTAIL_SYSTEM},
            {"role": "user", "content": ENTAIL_USER.format(premise=premise, claim=claim)}]


def parse_yes_no(reply: str) -> bool | None:
    m = re.search(r"\b(yes|no)\b", reply, re.I)
    return None if m is None else m.group(1).lower() == "yes"


def score_messages(topic: str, survey: str, name: str) -> list[dict]:
    return [{"role": "system", "content": SCORE_SYSTEM},
            {"role": "user", "content": SCORE_USER.format(topic=topic, survey=survey, name=name,
                                                          rubric=CRITERIA[name])}]


def parse_score(reply: str) -> int | None:
    m = re.search(r"(?<!\d)([1-5])(?!\d)", reply)
    return int(m.group(1)) if m else None


def fit_text(text: str, budget: int, count_tokens) -> str:
    """`text` cut (at a word, marked "...") so that count_tokens(result) <= budget."""
    if budget <= 0:
        return ""
    n = count_tokens(text)
    while n > budget and text:
        keep = max(0, int(len(text) * budget / n * 0.95) - 4)
        text = text[:keep].rsplit(" ", 1)[0] + " ..." if keep else ""
        n = count_tokens(text)
    return text


class Judge:
    """Entailment and score questions to a chat model, with the premise cut to the judge's context."""

    def __init__(self, model, context: int = 8192, max_premise: int | None = None):
        self.model, self.context = model, context
        self.max_premise = max_premise or context // 2

    def entails(self, premise: str, claim: str) -> tuple[bool | None, str]:
        premise = fit_text(premise, self.max_premise, self.model.count_tokens)
        reply = self.model.chat(entailment_messages(premise, claim), max_tokens=4, temperature=0.0)
        return parse_yes_no(reply), reply

    def score(self, topic: str, survey: str, name: str) -> tuple[int | None, str]:
        survey = fit_text(survey, self.context - 600, self.model.count_tokens)  # room for the rubric and answer
        reply = self.model.chat(score_messages(topic, survey, name), max_tokens=4, temperature=0.0)
        return parse_score(reply), reply
