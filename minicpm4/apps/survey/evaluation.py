"""`minicpm4 eval survey`: a finished run scored by an LLM judge, as a JSON report.

- SurveyEval-style scores (LLMxMapReduce-V2, as MiniCPM4-Survey reports them): relevance, coverage, depth,
  novelty, each 1-5, and their mean over the criteria the judge answered.
- Citation recall and precision in AutoSurvey's sense (Wang et al., 2024), over the cited sentences of the
  final survey (the claims the run recorded, with the passages they cite):
    recall    = claims whose cited passages, together, support them / claims;
    precision = relevant citations / citations, where a citation is relevant when its passage alone supports
                the claim, or the claim is supported with it and not without it (removing it breaks support).
- Hallucinated citations: the share of all citations in the model's text whose bibkey was never retrieved
  in the run (they were removed from the survey; this reports how many there were).

Judge answers that are neither yes/no nor a score are counted (`unparsed`) and never count in the model's
favour.
"""

from __future__ import annotations

import sys

from minicpm4.apps.survey.citations import premise
from minicpm4.apps.survey.judge import CRITERIA, Judge
from minicpm4.apps.survey.state import RunState
from minicpm4.errors import InputError


def survey_scores(judge: Judge, topic: str, survey_md: str) -> dict:
    scores, replies = {}, {}
    for name in CRITERIA:
        scores[name], replies[name] = judge.score(topic, survey_md, name)
    answered = [v for v in scores.values() if v is not None]
    return {**scores, "average": sum(answered) / len(answered) if answered else None,
            "unparsed": len(scores) - len(answered), "replies": replies}


def citation_quality(judge: Judge, claims: list[dict], retrieved: dict, progress=None) -> dict:
    cache: dict[tuple, bool | None] = {}

    def supports(keys: tuple[str, ...], claim: str) -> bool:
        if not keys:
            return False
        if (keys, claim) not in cache:
            cache[keys, claim] = judge.entails(premise(list(keys), retrieved), claim)[0]
            if progress is not None:
                progress(1)
        return cache[keys, claim] is True

    supported = relevant = n_citations = 0
    for c in claims:
        keys, claim = tuple(c["keys"]), c["claim"]
        whole = supports(keys, claim)
        supported += whole
        for k in keys:
            n_citations += 1
            alone = supports((k,), claim)
            rest = tuple(x for x in keys if x != k)
            relevant += alone or (whole and not supports(rest, claim))
    return {"claims": len(claims), "claims_supported": supported, "citation_recall": supported / len(claims)
            if claims else None, "citations": n_citations, "citations_relevant": relevant,
            "citation_precision": relevant / n_citations if n_citations else None,
            "judgments": len(cache), "unparsed": sum(v is None for v in cache.values())}


def evaluate(state: RunState, survey_md: str, judge: Judge, judge_name: str) -> dict:
    from tqdm import tqdm

    if state.final is None:
        raise InputError("the run has not finished (no final citation report in its state); "
                         "rerun `minicpm4 survey` with the same arguments to finish it")
    claims = state.final["claims"]
    scores = survey_scores(judge, state.topic, survey_md)
    with tqdm(desc="citation judgments", unit="judgment", file=sys.stderr) as bar:
        quality = citation_quality(judge, claims, state.retrieved, bar.update)
    total = state.final["citations"]
    return {"topic": state.topic, "judge": judge_name, "steps": state.step, "finish_reason": state.finish_reason,
            "passages_retrieved": len(state.retrieved), "scores": scores, "citations": quality,
            "hallucinated_citations": {"citations": total, "not_retrieved": state.final["citations_removed"],
                                       "share": state.final["citations_removed"] / total if total else None},
            "run_entailment": {"cited_sentences": state.final["cited_sentences"],
                               "unsupported_sentences": state.final["unsupported_sentences"]}}
