"""Citations: only passages retrieved in the run may be cited (others are removed and counted), cited sentences
the judge does not support are flagged, and the kept ones are numbered with a reference list. Plus the parsing
of the step format and the outline updates the citations live in."""

import pytest
from survey_corpus import QUILLON, ZORBLAX

from minicpm4.apps.survey.citations import UNSUPPORTED, cited_keys, split_sentences, write_survey
from minicpm4.apps.survey.document import UpdateError, apply_update, new_survey, text_blocks
from minicpm4.apps.survey.protocol import parse_reply


def retrieved_for(retriever, queries, k):
    return {f"p{h.passage.id}": h.passage.as_dict() for h in retriever.search(queries, k)}


def test_a_citation_to_a_passage_never_retrieved_is_removed(survey_retriever):
    retrieved = retrieved_for(survey_retriever, ["Zorblax quaternary handshake"], 1)
    (zorblax,) = [k for k, p in retrieved.items() if ZORBLAX in p["text"]]
    (quillon,) = [f"p{p.id}" for p in survey_retriever.index.passages if QUILLON in p.text]
    assert quillon not in retrieved  # a real passage of the index, but no search of this run returned it
    survey = new_survey()
    apply_update(survey, "section-1", {"title": "Handshakes", "content":
                 f"Zorblax uses a quaternary handshake \\cite{{{zorblax}}}. Reactors use bismuth \\cite{{{quillon}}}. "
                 f"Both are old [{zorblax}, smith2020]."})
    asked = []

    def judge(keys, claim):
        asked.append((keys, claim))
        return "quaternary" in claim

    md, report = write_survey(survey, "Protocols", retrieved, judge)
    assert report["citations"] == 4 and report["citations_removed"] == 2
    assert sorted(r["key"] for r in report["removed"]) == sorted([quillon, "smith2020"])
    assert report["hallucinated_share"] == 0.5
    assert quillon not in md and "smith2020" not in md and "\\cite" not in md
    assert "Zorblax uses a quaternary handshake [1]." in md
    assert "Reactors use bismuth." in md  # its only citation was removed: no claim left to check
    assert f"Both are old [1]. {UNSUPPORTED}" in md  # the judge found no support: flagged, not dropped
    assert asked == [([zorblax], "Zorblax uses a quaternary handshake."), ([zorblax], "Both are old.")]
    assert report["cited_sentences"] == 2 and report["unsupported_sentences"] == 1
    refs = md.split("## References")[1]
    assert refs.count("[1] ") == 1 and f"passage {zorblax}" in refs and "[2]" not in refs


def test_numbering_follows_first_use_and_unparsed_judgments_flag():
    retrieved = {k: {"title": k.upper(), "source": f"{k}.txt", "text": f"text of {k}"} for k in ("p3", "p7")}
    survey = new_survey()
    apply_update(survey, "introduction", "First \\cite{p7}. Second \\cite{p3,p7}.\n\nThird. \\cite{p3}")
    md, report = write_survey(survey, "T", retrieved, lambda keys, claim: None if claim == "Third." else True)
    assert "First [1]. Second [2, 1].\n\nThird [2]. " + UNSUPPORTED in md
    assert report["references"] == {"p7": 1, "p3": 2} and report["unparsed_judgments"] == 1


def test_sentences_and_keys():
    assert split_sentences("A is b. \\cite{p1} C is d [p2]! E?") == ["A is b. \\cite{p1}", "C is d [p2]!", "E?"]
    assert cited_keys("x \\cite{p1, p2} y [p3; p1] \\citep{p4}") == ["p1", "p2", "p3", "p4"]
    assert cited_keys("see [note] and [1] here [p5, smith2020]") == ["p5", "smith2020"]  # brackets need a pN


def test_outline_updates():
    s = new_survey()
    apply_update(s, "outline", {"title": "T", "sections": [{"title": "A", "plan": "a"}, "B"]})
    apply_update(s, "section-2/subsection-1", {"title": "B1", "content": "b1 text"})
    apply_update(s, "Section-1", "a text")
    assert s["title"] == "T" and [n["title"] for n in s["sections"]] == ["A", "B"]
    assert text_blocks(s) == [("section-1", "a text"), ("section-2/subsection-1", "b1 text")]
    with pytest.raises(UpdateError, match="add section-3 first"):
        apply_update(s, "section-4", "x")
    with pytest.raises(UpdateError, match="unknown position"):
        apply_update(s, "appendix", "x")
    with pytest.raises(UpdateError, match="must be text"):
        apply_update(s, "abstract", {"x": 1})


def test_reply_parsing():
    reply = ('<think>plan</think>\n<answer>```json\n{"update": "introduction", "content": "line one\nline two"}\n'
             '```</answer>\n<think>next</think>\n<tool_call>{"name": "search_engine", "arguments": '
             '{"query": ["a b", "", 3]}}</tool_call>')
    step = parse_reply(reply)
    assert step.errors == [] and step.update == {"update": "introduction", "content": "line one\nline two"}
    assert (step.answer_thought, step.plan_thought, step.tool, step.queries) == ("plan", "next", "search_engine", ["a b"])
    step = parse_reply('<answer>{}</answer><tool_call>{"name": "finalize", "arguments": {}}</tool_call>')
    assert step.update is None and step.tool == "finalize" and step.errors == []
    step = parse_reply("<answer>{not json</answer> <tool_call>{\"name\": \"rm -rf\"}")  # cut off by max_tokens
    assert step.tool is None and any("not valid JSON" in e for e in step.errors)
    assert any("unknown tool 'rm -rf'" in e for e in step.errors)
    assert parse_reply("plain prose").errors == ["no <answer>...</answer> found", "no <tool_call>...</tool_call> found"]
