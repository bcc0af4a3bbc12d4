"""Guided steps, for models too small to follow the step format (the offline default model, 135M parameters,
writes neither the tags nor the JSON): the loop takes the planning and tool decisions, and the model is asked
only for plain text it can produce.

Step 0 asks for section titles, one per line (when fewer than two usable lines come back, the titles of the
sources the topic retrieves are the outline). Step i then searches for "topic: section i" and asks for one
paragraph on that section from the passages, each shown as "[p12] title: text" so the citation form is in
front of the model. Everything after (state, resume, citation filter, entailment, evaluation) is the same as
for the full protocol; the history records what the loop decided, under tool "search_engine".
"""

from __future__ import annotations

import re

from minicpm4.apps.survey.document import apply_update
from minicpm4.apps.survey.judge import fit_text

PLAN = "List {n} section titles for a survey on: {topic}\nWrite one title per line and nothing else."
WRITE = """Passages:
{passages}

Write one paragraph for the section "{section}" of a survey on {topic}, using only the passages above.
After each sentence, cite the passage it comes from as [p12]."""


def parse_titles(reply: str, n: int) -> list[str]:
    titles = []
    for line in reply.splitlines():
        line = re.sub(r"^\s*(?:[-*#]+|\d+[.)]|section\s+\d+[:.]?)\s*", "", line, flags=re.I).strip(" *\"'")
        if 2 <= len(line.split()) <= 12 and line.lower() not in (t.lower() for t in titles):
            titles.append(line.rstrip(":"))
    return titles[:n]


def guided_step(state, model, retriever, s) -> dict:
    """One guided step; mutates `state` like loop.run_step and returns the history record."""
    errors = []
    if state.step == 0:
        reply = model.chat([{"role": "user", "content": PLAN.format(n=s.guided_sections, topic=state.topic)}],
                           max_tokens=200, temperature=s.temperature, seed=s.seed)
        titles = parse_titles(reply, s.guided_sections)
        if len(titles) < 2:
            errors.append(f"{len(titles)} usable title(s) in the reply; the outline is the retrieved sources' titles")
            hits = retriever.search([state.topic], s.first_k)
            titles = list(dict.fromkeys(h.passage.title for h in hits))[:s.guided_sections]
        apply_update(state.survey, "outline", {"title": state.topic, "sections": [{"title": t} for t in titles]})
        record = {"step": 0, "reply": reply, "updated": "outline", "tool": "search_engine", "queries": [],
                  "results": [], "errors": errors, "passages_cut": 0}
    else:
        i = state.step
        title = state.survey["sections"][i - 1]["title"]
        k = s.first_k if i < s.first_steps else s.k
        hits = retriever.search([f"{state.topic}: {title}", title], k)
        keys = [f"p{h.passage.id}" for h in hits]
        for key, h in zip(keys, hits):
            state.retrieved.setdefault(key, h.passage.as_dict())
        budget = s.context - s.max_new_tokens - 200  # 200: the instructions and the chat template
        share, cut, blocks = budget // max(1, len(hits)), 0, []
        for key, h in zip(keys, hits):
            block = f"[{key}] {h.passage.title}: {h.passage.text}"
            if not s.sparse and model.count_tokens(block) > share:
                block, cut = fit_text(block, share, model.count_tokens), cut + 1
            blocks.append(block)
        prompt = WRITE.format(passages="\n\n".join(blocks), section=title, topic=state.topic)
        reply = model.chat([{"role": "user", "content": prompt}], max_tokens=s.max_new_tokens,
                           temperature=s.temperature, seed=s.seed + i)
        apply_update(state.survey, f"section-{i}", reply.strip())
        record = {"step": i, "reply": reply, "updated": f"section-{i}", "tool": "search_engine",
                  "queries": [f"{state.topic}: {title}", title], "results": keys, "errors": errors,
                  "passages_cut": cut}
    state.history.append(record)
    state.last = {"thought": "", "tool_call": "{}", "results": record["results"], "errors": errors}
    state.step += 1
    if state.step > len(state.survey["sections"]):
        state.finish_reason = "finalize"  # every planned section is written
    elif state.step >= s.max_steps:
        state.finish_reason = "max_steps"
    return record
