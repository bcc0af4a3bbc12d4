"""The step loop's control flow against a scripted OpenAI-compatible endpoint (tests/fake_openai.py, real HTTP):
outline, search, write with citations, finalize; the citation filter and entailment judge at the end; the
evaluation report; resume after the process is killed mid-step; a clear error when the endpoint is down."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

from fake_openai import FakeEndpoint, serving
from survey_corpus import GLIMMERFISH, MARMOT, ZORBLAX

from minicpm4.apps.survey.chat import EndpointChat
from minicpm4.apps.survey.citations import UNSUPPORTED
from minicpm4.apps.survey.evaluation import evaluate
from minicpm4.apps.survey.judge import Judge
from minicpm4.apps.survey.loop import LoopSettings, run_survey
from minicpm4.apps.survey.state import load_state, state_path

ROOT = Path(__file__).resolve().parents[2]


def bibkey(prompt: str, source: str) -> str:
    return re.search(rf"bibkey: (p\d+)\nTitle: [^\n]* \({re.escape(source)}\)", prompt).group(1)


def step(update: dict | None, tool: dict) -> str:
    return (f"<think>what to write</think>\n<answer>{json.dumps(update) if update else '{}'}</answer>\n"
            f"<think>what next</think>\n<tool_call>{json.dumps(tool)}</tool_call>")


def search(*queries):
    return {"name": "search_engine", "arguments": {"query": list(queries)}}


FINALIZE = {"name": "finalize", "arguments": {}}
OUTLINE = {"update": "outline", "content": {"title": "Odd protocols", "sections": [
    {"title": "Handshakes", "plan": "Zorblax"}, {"title": "Fauna", "plan": "fish"}]}}


class Writer:
    """Scripted survey steps (by order of arrival) plus a judge: claims about a "quaternary" handshake are
    supported, everything else is not; every SurveyEval score is 3."""

    def __init__(self, steps, block_at=None):
        self.steps, self.calls, self.survey_prompts = steps, 0, []
        self.block_at, self.arrived, self.release = block_at, threading.Event(), threading.Event()

    def __call__(self, prompt: str) -> str:
        if "Is the claim supported by the premise?" in prompt:
            claim = prompt.split("Claim:\n", 1)[1]
            return "Yes." if "quaternary" in claim.split("\n\nIs the claim")[0] else "No, it is not."
        if "Answer with the number only." in prompt:
            return "3"
        n, self.calls = self.calls, self.calls + 1
        self.survey_prompts.append(prompt)
        if n == self.block_at:  # hold the request until the test has killed the client
            self.arrived.set()
            self.release.wait(120)
        return self.steps[n](prompt)


def write_zorblax(prompt):
    z = bibkey(prompt, "zorblax.txt")
    return step({"update": "section-1", "content":
                 f"Zorblax opens sessions with a quaternary handshake \\cite{{{z}}}. The handshake also cools "
                 f"reactors \\cite{{{z},NEVER_RETRIEVED}}. It was designed in 1999 \\cite{{smith2020}}."},
                search("glimmerfish violet moonlight"))


def test_loop_writes_checks_citations_and_evaluates(survey_retriever, tmp_path):
    marmot = next(f"p{p.id}" for p in survey_retriever.index.passages if MARMOT in p.text)
    steps = [lambda p: step(OUTLINE, search("Zorblax quaternary handshake")),
             lambda p: write_zorblax(p).replace("NEVER_RETRIEVED", marmot),
             lambda p: step({"update": "section-2", "content": f"Glimmerfish spawn under violet moonlight "
                                                               f"\\cite{{{bibkey(p, 'fish.html')}}}."}, FINALIZE)]
    writer = Writer(steps)
    out = tmp_path / "survey.md"
    with serving(FakeEndpoint(writer)) as url:
        model = EndpointChat(url)
        report = run_survey("Odd protocols", out, model, survey_retriever,
                            LoopSettings(max_steps=10, first_steps=1, first_k=2, k=1), log=lambda m: None)
        state = load_state(state_path(out))
        assert marmot not in state.retrieved  # a passage of the index that no search returned
        ev = evaluate(state, out.read_text(), Judge(model), "fake")
    assert ZORBLAX in writer.survey_prompts[1] and GLIMMERFISH in writer.survey_prompts[2]
    assert [h["tool"] for h in state.history] == ["search_engine", "search_engine", "finalize"]
    assert [len(h["results"]) for h in state.history] == [2, 1, 0]  # first_k for the first steps, then k
    assert report["finish_reason"] == "finalize" and report["steps"] == 3
    assert report["citations"] == 5 and report["citations_removed"] == 2
    assert sorted(r["key"] for r in report["removed"]) == sorted([marmot, "smith2020"])
    assert report["cited_sentences"] == 3 and report["unsupported_sentences"] == 2
    md = out.read_text()
    assert "Zorblax opens sessions with a quaternary handshake [1]." in md
    assert f"The handshake also cools reactors [1]. {UNSUPPORTED}" in md
    assert "It was designed in 1999." in md and "smith2020" not in md and marmot not in md
    assert f"Glimmerfish spawn under violet moonlight [2]. {UNSUPPORTED}" in md
    assert "## 1 Handshakes" in md and "## 2 Fauna" in md and md.count("(passage p") == 2
    assert ev["scores"]["average"] == 3 and ev["scores"]["unparsed"] == 0
    c = ev["citations"]
    assert (c["claims"], c["claims_supported"], c["citation_recall"]) == (3, 1, 1 / 3)
    assert (c["citations"], c["citations_relevant"]) == (3, 1)
    assert ev["hallucinated_citations"] == {"citations": 5, "not_retrieved": 2, "share": 0.4}


def survey_cli(url, sources, index, out, *extra):
    cmd = [sys.executable, "-m", "minicpm4.cli", "survey", "Odd protocols", "--sources", str(sources),
           "--index", str(index), "-o", str(out), "--base-url", url, "--max-steps", "10", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_resume_after_kill(survey_sources, survey_retriever, tmp_path):
    steps = [lambda p: step(OUTLINE, search("Zorblax quaternary handshake")),
             lambda p: write_zorblax(p).replace("NEVER_RETRIEVED", "p999"),
             lambda p: step({"update": "section-2", "content": "Fish glow."}, search("glimmerfish")),
             lambda p: step({"update": "section-2", "content": "Fish glow."}, search("glimmerfish")),
             lambda p: step({"update": "conclusion", "content": "Done."}, FINALIZE)]
    writer = Writer(steps, block_at=2)
    out = tmp_path / "survey.md"
    index = survey_retriever.index.path
    with serving(FakeEndpoint(writer)) as url:
        proc = survey_cli(url, survey_sources, index, out)
        try:
            assert writer.arrived.wait(180), proc.communicate(timeout=5)
            os.killpg(proc.pid, signal.SIGKILL)  # mid-step: step 2's request is in flight
            proc.wait(timeout=30)
        finally:
            writer.release.set()
        state = load_state(state_path(out))
        assert state.step == 2 and state.final is None and not out.exists()
        proc = survey_cli(url, survey_sources, index, out)
        stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "resuming" in stderr and "5 steps" not in stdout
    # the resumed run asked step 2 again with exactly the prompt of the cut-off request, then went on
    assert writer.survey_prompts[3] == writer.survey_prompts[2] and writer.calls == 5
    state = load_state(state_path(out))
    assert [h["step"] for h in state.history] == [0, 1, 2, 3] and state.finish_reason == "finalize"
    assert state.final["citations_removed"] == 2 and "Fish glow." in out.read_text()


def test_endpoint_down_is_a_clear_error(survey_sources, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    url = f"http://127.0.0.1:{port}/v1"
    proc = survey_cli(url, survey_sources, tmp_path / "index", tmp_path / "s.md")
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert f"error: --base-url {url}: endpoint not reachable" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "index").exists()  # it failed before building anything


def test_guided_steps_plan_search_and_write(survey_retriever, tmp_path):
    def reply(prompt):
        if prompt.startswith("List 2 section titles"):
            return "Sure!" if "survey on: Zorblax\n" in prompt else "1. Zorblax handshakes\n2. Glimmerfish spawning\nok"
        if "Write one paragraph" in prompt:
            keys = re.findall(r"^\[(p\d+)\]", prompt, re.M)
            return f"Zorblax uses a quaternary handshake [{keys[0]}]. Fish glow [p999]."
        return "Yes" if "quaternary" in prompt.split("Claim:\n", 1)[-1] else "No"

    with serving(FakeEndpoint(reply)) as url:
        report = run_survey("Odd protocols", tmp_path / "s.md", EndpointChat(url), survey_retriever,
                            LoopSettings(max_steps=10, guided=True, guided_sections=2, first_k=3, k=2),
                            log=lambda m: None)
        state = load_state(state_path(tmp_path / "s.md"))
        # a model that cannot list titles: the outline comes from the titles of what the topic retrieves
        run_survey("Zorblax", tmp_path / "t.md", EndpointChat(url), survey_retriever,
                   LoopSettings(max_steps=1, guided=True, guided_sections=2), log=lambda m: None)
    assert [n["title"] for n in state.survey["sections"]] == ["Zorblax handshakes", "Glimmerfish spawning"]
    assert [len(h["results"]) for h in state.history] == [0, 3, 3] and report["finish_reason"] == "finalize"
    assert report["citations"] == 4 and report["citations_removed"] == 2 and report["unsupported_sentences"] == 0
    md = (tmp_path / "s.md").read_text()
    assert md.count("Zorblax uses a quaternary handshake [") == 2 and "p999" not in md
    fallback = load_state(state_path(tmp_path / "t.md"))
    assert fallback.history[0]["errors"] and fallback.survey["sections"][0]["title"] == "zorblax"


def test_passages_are_cut_to_a_dense_context_and_whole_with_sparse():
    from minicpm4.apps.survey.loop import build_messages
    from minicpm4.apps.survey.state import RunState

    words = " ".join(f"w{i}" for i in range(2000))  # ~2,700 estimated tokens per passage
    state = RunState(topic="T", settings={})
    state.retrieved = {f"p{i}": {"title": f"t{i}", "source": f"s{i}.txt", "text": f"{words} END{i}"} for i in range(4)}
    state.last["results"] = list(state.retrieved)
    count = EndpointChat.count_tokens
    dense, cut = build_messages(state, LoopSettings(context=4096, max_new_tokens=512), count)
    assert cut == 4 and sum(count(m["content"]) for m in dense) <= 4096 - 512
    assert all(f"bibkey: p{i}" in dense[1]["content"] and f"END{i}" not in dense[1]["content"] for i in range(4))
    sparse, cut = build_messages(state, LoopSettings(context=4096, max_new_tokens=512, sparse=True), count)
    assert cut == 0 and all(f"END{i}" in sparse[1]["content"] for i in range(4))
    assert sum(count(m["content"]) for m in sparse) > 10000  # one long prompt, for InfLLM v2


def test_a_rejected_update_changes_nothing_and_is_shown_to_the_model(survey_retriever, tmp_path):
    bad = {"update": "section-1/subsection-1", "content": {"title": 5}}  # would create the nodes, then fail
    steps = [lambda p: step(bad, search("threads")), lambda p: step(None, FINALIZE)]
    writer = Writer(steps)
    with serving(FakeEndpoint(writer)) as url:
        run_survey("T", tmp_path / "s.md", EndpointChat(url), survey_retriever, LoopSettings(), log=lambda m: None)
    state = load_state(state_path(tmp_path / "s.md"))
    assert state.survey["sections"] == [] and state.history[0]["updated"] is None
    assert state.history[0]["errors"] == ["section-1/subsection-1.title must be a string"]
    assert "**Problems with your last reply**\n- section-1/subsection-1.title must be a string" in writer.survey_prompts[1]
