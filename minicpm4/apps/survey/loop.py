"""The Plan-Retrieve-Write loop: prompt, parse, update the survey, then search or finalize; state saved per step.

Retrieval depth follows MiniCPM4-Survey's demo: the top 20 passages for the first steps (while the outline
is planned), 10 afterwards. The passages of the last search go into the next prompt. With a dense context
they are cut, each to an equal share of the tokens left once the survey and the instructions are in; with
`sparse` (InfLLM v2 on the serving model) they go in whole, in one long prompt. When even the survey alone
does not fit, each written part is shown shortened in the prompt (never in the saved survey).

`guided` replaces the step format with guided.py's steps, for models too small to follow it.

Sampling is seeded by step (seed + step), so a resumed run asks the same question with the same seed as an
uninterrupted one would.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path

from minicpm4.apps.survey.citations import judgment_key, premise, write_survey
from minicpm4.apps.survey.document import UpdateError, apply_update
from minicpm4.apps.survey.guided import guided_step
from minicpm4.apps.survey.judge import Judge, fit_text
from minicpm4.apps.survey.protocol import SYSTEM, parse_reply, passage_block, user_prompt
from minicpm4.apps.survey.state import RunState, open_state, state_path
from minicpm4.fileio import atomic_write_text


@dataclass
class LoopSettings:
    max_steps: int = 12
    first_steps: int = 3  # steps that retrieve `first_k` passages
    first_k: int = 20
    k: int = 10
    context: int = 8192  # the model's context, prompt and reply together
    max_new_tokens: int = 1024
    temperature: float = 0.7
    seed: int = 0
    sparse: bool = False  # passages uncut in one long prompt
    guided: bool = False  # the loop plans and searches; the model writes titles and paragraphs (guided.py)
    guided_sections: int = 4

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _shrink_survey(survey: dict, chars: int) -> dict:
    view = copy.deepcopy(survey)

    def cut(text: str) -> str:
        return text if len(text) <= chars else text[:chars].rsplit(" ", 1)[0] + " ..."

    for key in ("abstract", "introduction", "conclusion"):
        view[key] = cut(view[key])
    stack = list(view["sections"])
    while stack:
        node = stack.pop()
        node["content"] = cut(node["content"])
        stack += node["subsections"]
    return view


def build_messages(state: RunState, s: LoopSettings, count_tokens) -> tuple[list[dict], int]:
    """The step's messages and how many passages were cut to fit."""
    last = state.last
    shown = [state.retrieved[k] for k in last["results"]]
    survey = state.survey

    def messages(blocks):
        user = user_prompt(state.topic, survey, last["thought"], last["tool_call"], blocks, last["errors"])
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]

    full = [passage_block(k, p) for k, p in zip(last["results"], shown)]
    if s.sparse:
        return messages(full), 0
    budget = s.context - s.max_new_tokens - 32  # 32: chat-template tokens around the two messages
    for chars in (None, 2000, 600, 200):
        if chars is not None:
            survey = _shrink_survey(state.survey, chars)
        fixed = sum(count_tokens(m["content"]) for m in messages([]))
        if fixed <= budget:
            break
    left = budget - fixed
    if not full or sum(count_tokens(b) for b in full) + 2 * len(full) <= left:
        return messages(full), 0
    share = left // len(full) - 2
    blocks, cut = [], 0
    for key, p in zip(last["results"], shown):
        block = passage_block(key, p)
        if count_tokens(block) > share:
            head = count_tokens(passage_block(key, p, " "))
            text = fit_text(p["text"], share - head, count_tokens)
            cut += 1
            if not text:
                continue
            block = passage_block(key, p, text)
        blocks.append(block)
    return messages(blocks), cut


def run_step(state: RunState, model, retriever, s: LoopSettings) -> dict:
    """One step: ask, parse, apply the update, run the tool. Mutates `state`; returns the history record."""
    msgs, cut = build_messages(state, s, model.count_tokens)
    reply = model.chat(msgs, max_tokens=s.max_new_tokens, temperature=s.temperature, seed=s.seed + state.step)
    step = parse_reply(reply)
    errors = list(step.errors)
    position = None
    if step.update is not None:
        draft = copy.deepcopy(state.survey)  # a rejected update leaves no half-made section behind
        try:
            position = apply_update(draft, step.update["update"], step.update["content"])
            state.survey = draft
        except UpdateError as e:
            errors.append(str(e))
    results = []
    if step.tool == "search_engine":
        k = s.first_k if state.step < s.first_steps else s.k
        for hit in retriever.search(step.queries, k):
            key = f"p{hit.passage.id}"
            state.retrieved.setdefault(key, hit.passage.as_dict())
            results.append(key)
    record = {"step": state.step, "reply": reply, "updated": position, "tool": step.tool, "queries": step.queries,
              "results": results, "errors": errors, "passages_cut": cut}
    state.history.append(record)
    state.last = {"thought": step.plan_thought, "tool_call": step.tool_call_text, "results": results,
                  "errors": errors}
    state.step += 1
    if step.tool == "finalize":
        state.finish_reason = "finalize"
    elif state.step >= s.max_steps:
        state.finish_reason = "max_steps"
    return record


def run_survey(topic: str, out: Path, model, retriever, settings: LoopSettings, judge_model=None,
               judge_context: int = 8192, restart: bool = False, log=lambda m: print(m, file=sys.stderr)) -> dict:
    """Run (or resume) the loop until finalize or max_steps, then check citations and write `out`.
    Returns the citation report."""
    from tqdm import tqdm

    out = Path(out)
    path = state_path(out)
    state = open_state(path, topic, settings.as_dict(), restart)
    if state.step and state.final is None:
        log(f"[survey: resuming {path} after step {state.step}]")
    state.settings = settings.as_dict()  # a resumed run goes on with this command's settings
    if state.finish_reason == "max_steps" and state.step < settings.max_steps:
        state.finish_reason = None  # a larger --max-steps continues a run that stopped at the old limit
    model.check()
    total = min(settings.max_steps, settings.guided_sections + 1) if settings.guided else settings.max_steps
    with tqdm(total=total, initial=min(state.step, total), desc="survey steps",
              unit="step", file=sys.stderr) as bar:
        while state.finish_reason is None and state.step < settings.max_steps:
            record = (guided_step if settings.guided else run_step)(state, model, retriever, settings)
            state.final = None
            state.save(path)
            bar.update(1)
            bar.set_postfix_str(f"{record['tool'] or 'no tool'}, {len(state.retrieved)} passages seen")
        if state.finish_reason is None:
            state.finish_reason = "max_steps"
    if state.final is None:
        judge = Judge(judge_model or model, context=judge_context)
        md, report = finalize(state, judge, path)
        atomic_write_text(out, md)
        state.final = report
        state.save(path)
    return state.final


def finalize(state: RunState, judge: Judge, path: Path) -> tuple[str, dict]:
    """Citation filter, entailment checks (cached in the state, saved after each) and the Markdown."""
    from tqdm import tqdm

    bar = tqdm(desc="entailment checks", unit="sentence", file=sys.stderr)

    def entails(keys: list[str], claim: str):
        key = judgment_key(keys, claim)
        if key not in state.judgments:
            supported, reply = judge.entails(premise(keys, state.retrieved), claim)
            state.judgments[key] = {"supported": supported, "reply": reply}
            state.save(path)
        bar.update(1)
        return state.judgments[key]["supported"]

    try:
        md, report = write_survey(state.survey, state.topic, state.retrieved, entails)
    finally:
        bar.close()
    report = {"topic": state.topic, "steps": state.step, "finish_reason": state.finish_reason,
              "passages_retrieved": len(state.retrieved), **report}
    return md, report
