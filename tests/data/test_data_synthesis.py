"""Synthesis against a fake OpenAI-compatible endpoint over real HTTP: tracks, retries, limits, resume, dedup."""

import asyncio
import json
import re

import pytest
from click.testing import CliRunner
from fake_openai import FakeEndpoint, serving

from minicpm4.data.synth_client import ClientSettings
from minicpm4.data.synth_store import SampleStore
from minicpm4.data.synthesis import synthesize

SEEDS = [("s1", "Heat flows from hot bodies to cold bodies until they reach the same temperature."),
         ("s2", "A prime number has exactly two divisors: one and itself."),
         ("s3", "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen."),
         ("s4", "The moon orbits the earth about once every twenty-seven days.")]
IF_CANDIDATES = ["Heat, light, and sound are all forms of energy, and this is a long answer with commas.",
                 "- heat moves\n- it moves from hot to cold\n- it stops at equal temperature",
                 "heat moves from hot to cold because that is the first law that matters. That is all.",
                 '{"topic": "heat", "summary": "flows from hot to cold"}']


def _doc(prompt):
    return prompt.split("DOCUMENT:\n", 1)[-1].split("TEXT:\n", 1)[-1]


def brain(prompt, _if=iter(range(10**6))):
    """Answers each prompt template; markers in the seed text choose good or bad behaviour."""
    if prompt.startswith("Rewrite the document below as a short textbook"):
        return "Key points: " + _doc(prompt)[:40]
    if "forum thread" in prompt:
        return "User 1: " + _doc(prompt)[:30] + "\nUser 2: I disagree.\nUser 1: Settled."
    if prompt.startswith("Pick one knowledge point"):
        return "QUESTION: What does this say: " + _doc(prompt).split()[0] + "?"
    if prompt.startswith("Rewrite this question"):
        return "QUESTION: Why " + prompt.split("ORIGINAL: ", 1)[1]
    if prompt.startswith("Here is a question and an answer"):
        return "Step 1: restate. Step 2: explain differently."
    if prompt.startswith("Why "):
        return "Because of the reason given."
    if prompt.startswith("Write one high-school math problem"):
        n = len(_doc(prompt).split())
        wrong = "prime" in _doc(prompt)  # this seed's stated answer is off by one: the re-solve disagrees
        return f"PROBLEM: What is {n} + {n}?\nSOLUTION: {n} + {n} = {2 * n}.\nANSWER: {2 * n + wrong}"
    if prompt.startswith("Solve this problem"):
        a = int(re.search(r"What is (\d+)", prompt).group(1))
        return f"Doubling.\nANSWER: {2 * a}"
    if prompt.startswith("Write one high-school Python programming task"):
        bad = "moon" in _doc(prompt)
        return (f"PROBLEM: Write add(a, b) ({_doc(prompt).split()[0]}).\nSOLUTION:\n```python\ndef add(a, b):\n    return a + b\n```\n"
                f"TESTS:\n```python\nassert add(2, 3) == {6 if bad else 5}\n```")
    if prompt.startswith("Check whether this solution passes"):
        return "VERDICT: fail" if "== 6" in prompt else "VERDICT: pass"
    if prompt.startswith("Write about the subject"):
        return IF_CANDIDATES[next(_if) % len(IF_CANDIDATES)]
    if prompt.startswith("Write one question that can only be answered"):
        return "QUESTION: What is the secret code?"
    if "Answer using the documents above" in prompt:
        m = re.search(r"secret code is (\w+)", prompt)
        return f"The secret code is {m.group(1)}." if m else ""
    if prompt.startswith("You write training data for tool use"):
        topic = prompt.split("related to this topic if you can: ", 1)[1]
        args = {"city": "Paris", "days": 3}
        if "badtype" in topic:
            args["days"] = "three"
        name = "nope" if "unknowntool" in topic else "get_weather"
        if "missing" in topic:
            args = {"days": 2}
        return f"USER: Weather in Paris?\nTHOUGHT: I need the forecast.\nCALL: {json.dumps({'name': name, 'arguments': args})}"
    return "ok"


def settings(url, **kw):
    return ClientSettings(url, "fake", **{"concurrency": 2, "backoff": 0.01, **kw})


def lines(path):
    return [json.loads(x) for x in open(path)]


def run(track, seeds, out, url, context=None, **kw):
    return asyncio.run(synthesize(track, seeds, str(out), settings(url, **kw), context))


def test_rewrites_with_retries_and_concurrency_limit(tmp_path):
    ep = FakeEndpoint(brain, failures=[500, 429, 503], delay=0.05)
    with serving(ep) as url:
        report = run("textbook", SEEDS, tmp_path / "tb.jsonl", url, concurrency=3)
    assert report["samples"] == 4 and report["processed"] == 4 and not report.get("failed_seeds")
    assert report["client"]["retries"] == 3 and ep.statuses[:3] == [500, 429, 503]
    assert 2 <= ep.max_in_flight <= 3
    out = lines(tmp_path / "tb.jsonl")
    assert sorted(s["seed_id"] for s in out) == ["s1", "s2", "s3", "s4"]
    assert all(s["text"].startswith("Key points: ") and s["track"] == "textbook" for s in out)


def test_failures_are_counted_and_retried_on_resume(tmp_path):
    seeds = SEEDS[:2] + [("bad", "BADREQUEST please")]
    ep = FakeEndpoint(brain, failures=[500] * 3)
    with serving(ep) as url:
        # concurrency 1, 2 retries: the first seed meets three 500s and gives up; "bad" gets a 400 at once
        report = run("forum", seeds, tmp_path / "f.jsonl", url, concurrency=1, retries=2)
        assert report["failed_seeds"] == 2 and report["samples"] == 1
        assert report["client"]["retryable_500"] == 3 and report["client"]["failures"] == 2
        n_prompts = len(ep.prompts)
        again = run("forum", seeds, tmp_path / "f.jsonl", url)  # resume: only the unfinished seeds
    assert again["already_done"] == 1 and again["samples"] == 1 and again["failed_seeds"] == 1
    assert len(ep.prompts) == n_prompts + 1
    assert sorted(s["seed_id"] for s in lines(tmp_path / "f.jsonl")) == ["s1", "s2"]


def test_resume_dedup_and_recovery(tmp_path):
    out = tmp_path / "kn.jsonl"
    twin = [("s5", SEEDS[0][1])]  # same text as s1: the same samples come back and are deduplicated
    ep = FakeEndpoint(brain)
    with serving(ep) as url:
        first = run("knowledge", SEEDS[:2], out, url)
        calls = len(ep.prompts)
        second = run("knowledge", SEEDS + twin, out, url)
    assert first["samples"] == 4 and second["already_done"] == 2 and second["samples"] == 4
    assert second["duplicates"] == 2 and len(ep.prompts) == calls + 3 * 4
    samples = lines(out)
    assert len(samples) == 8 and len({json.dumps(s["messages"]) for s in samples}) == 8
    q, a = samples[0]["messages"]
    assert q["role"] == "user" and q["content"].startswith("Why What does this say") and a["role"] == "assistant"
    # a crash after a seed's samples but before its done mark, plus a torn line: both dropped on reopen
    with open(out, "a") as f:
        f.write(json.dumps({"messages": [], "seed_id": "orphan"}) + "\n" + '{"messages": [{"ro')
    store = SampleStore(out)
    store.close()
    assert store.dropped_partial == 1 and lines(out) == samples and store.done == {"s1", "s2", "s3", "s4", "s5"}


def test_math_and_code_self_check(tmp_path):
    ep = FakeEndpoint(brain)
    with serving(ep) as url:
        math = run("math", SEEDS, tmp_path / "m.jsonl", url)
        review = run("code", SEEDS, tmp_path / "c.jsonl", url)
        executed = run("code", SEEDS, tmp_path / "c2.jsonl", url, context={"run_tests": True})
    assert math["samples"] == 3 and math["rejected"] == {"self_check_disagree": 1}
    assert "s2" not in {s["seed_id"] for s in lines(tmp_path / "m.jsonl")}
    for s in lines(tmp_path / "m.jsonl"):
        n = int(re.search(r"What is (\d+)", s["messages"][0]["content"]).group(1))
        assert s["messages"][1]["content"].endswith(f"Answer: {2 * n}")
    for report, path in ((review, "c.jsonl"), (executed, "c2.jsonl")):
        assert report["samples"] == 3 and report["rejected"] == {"self_check_fail": 1}
        assert "s4" not in {s["seed_id"] for s in lines(tmp_path / path)}


def test_instruction_following_keeps_only_compliant(tmp_path):
    ep = FakeEndpoint(brain)
    with serving(ep) as url:
        report = run("instruction", SEEDS, tmp_path / "if.jsonl", url, concurrency=1,
                     context={"constraints": 2, "candidates": 3, "seed": 1})
    samples = lines(tmp_path / "if.jsonl")
    assert samples and report["samples"] == len(samples)
    assert any(r.startswith("broke_") for r in report["rejected"])  # some candidates were thrown away
    for s in samples:
        reply = s["messages"][1]["content"]
        assert reply in IF_CANDIDATES
        for kind, value in s["constraints"]:  # check each recorded constraint by hand, not via the verifier
            ok = {"max_words": lambda: len(reply.split()) <= value,
                  "min_words": lambda: len(reply.split()) >= value,
                  "no_commas": lambda: "," not in reply,
                  "lowercase": lambda: reply == reply.lower(),
                  "json": lambda: isinstance(json.loads(reply), dict),
                  "bullets": lambda: all(x.startswith("- ") for x in reply.splitlines()) and
                  len(reply.splitlines()) == value,
                  "ends_with": lambda: reply.endswith(value),
                  "include": lambda: all(w in reply.lower().split() for w in value),
                  "exclude": lambda: not any(w in re.findall(r"\w+", reply.lower()) for w in value),
                  "paragraphs": lambda: len(reply.split("\n\n")) == value}[kind]()
            assert ok, (kind, value, reply)
    levels = [len(s["constraints"]) for s in samples]
    assert set(levels) <= {1, 2}


def test_long_context_plants_the_seed_among_retrieved(tmp_path):
    pool = [("target", "The secret code is PELICAN. Heat flows from hot to cold bodies.")]
    pool += [(f"d{i}", f"Heat and cold bodies story number {i} about temperature.") for i in range(3)]
    pool += [(f"x{i}", f"Unrelated shopping list {i}: apples pears.") for i in range(3)]
    ep = FakeEndpoint(brain)
    with serving(ep) as url:
        run("long_context", pool, tmp_path / "lc.jsonl", url, context={"retrieved": 3, "seed": 3})
    sample = next(s for s in lines(tmp_path / "lc.jsonl") if s["seed_id"] == "target")
    prompt, answer = sample["messages"][0]["content"], sample["messages"][1]["content"]
    docs = re.findall(r"Document \d+:\n(.*)", prompt)
    assert sample["documents"] == len(docs) == 4
    assert docs[sample["position"]] == pool[0][1]
    assert sorted(docs[:sample["position"]] + docs[sample["position"] + 1:]) == sorted(t for _, t in pool[1:4])
    assert prompt.endswith("What is the secret code?") and answer == "The secret code is PELICAN."


def test_tool_use_calls_are_validated_against_the_schema(tmp_path):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Forecast",
              "parameters": {"type": "object", "required": ["city"], "properties": {
                  "city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}}}}}]
    (tmp_path / "tools.json").write_text(json.dumps(tools))
    seeds = [("ok", "valid weather question"), ("t", "badtype days"), ("u", "unknowntool call"),
             ("m", "missing city")]
    ep = FakeEndpoint(brain)
    with serving(ep) as url:
        result = CliRunner().invoke(_cli(), ["data", "synth", "--track", "tool_use", "--seeds",
                                             str(_write_seeds(tmp_path, seeds)), "--tools", str(tmp_path / "tools.json"),
                                             "-o", str(tmp_path / "tu.jsonl"), "--base-url", url, "--model", "fake"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["samples"] == 1 and report["rejected"] == {"schema": 2, "unknown_tool": 1}
    (sample,) = lines(tmp_path / "tu.jsonl")
    user, assistant = sample["messages"]
    call = assistant["tool_calls"][0]["function"]
    assert assistant["content"] == "I need the forecast." and call["name"] == "get_weather"
    assert json.loads(call["arguments"]) == {"city": "Paris", "days": 3} and sample["tools"] == tools
    # the output is what `minicpm4 train sft` reads: the call is rendered into the chat and is the SFT target
    from minicpm4.io.loader import default_model_dir
    from minicpm4.text.tokenizer import Tokenizer
    from minicpm4.train.chat_data import read_chat_jsonl
    from minicpm4.train.linear_cross_entropy import IGNORE
    tok = Tokenizer.from_dir(default_model_dir())
    ((ids, labels),) = read_chat_jsonl(tmp_path / "tu.jsonl", tok, 512)
    target = tok.decode(labels[labels != IGNORE].tolist())
    assert "get_weather" in target and "Paris" in target and "Weather in Paris?" not in target


def _cli():
    from minicpm4.cli import _register_all, cli
    _register_all()
    return cli


def _write_seeds(tmp_path, seeds):
    path = tmp_path / "seeds.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in seeds))
    return path


def test_constraints_on_literal_strings():
    import random

    from minicpm4.data.constraints import Constraint, failures, layered

    assert Constraint("max_words", 3).check("one two three") and not Constraint("max_words", 3).check("a b c d")
    assert Constraint("bullets", 2).check("- a\n- b") and not Constraint("bullets", 2).check("- a\nb")
    assert Constraint("ends_with", "That is all.").check("Done. That is all.  ")
    assert Constraint("json").check('{"a": 1}') and not Constraint("json").check("[1]")
    assert Constraint("paragraphs", 2).check("p one\n\np two") and not Constraint("paragraphs", 2).check("p")
    assert Constraint("include", ("step", "first")).check("First, one step.")
    assert not Constraint("exclude", ("step",)).check("a Step here")
    assert failures("Hello, World", [Constraint("lowercase"), Constraint("no_commas")]) == ["lowercase", "no_commas"]
    for seed in range(20):  # layered draws never combine clashing kinds
        kinds = {c.kind for c in layered(random.Random(seed), 4)}
        assert len(kinds) == (3 if "json" in kinds else 4) and not {"json", "bullets"} <= kinds and not {"max_words", "min_words"} <= kinds


def test_tool_call_validation_and_bad_tool_files(tmp_path):
    from minicpm4.data.tool_calls import load_tools, validate_call
    from minicpm4.errors import ConfigError

    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer"}, "unit": {"enum": ["c", "f"]}},
        "required": ["n"], "additionalProperties": False}}}]
    assert validate_call({"name": "f", "arguments": {"n": 1}}, tools) is None
    assert validate_call({"name": "f", "arguments": '{"n": 1, "unit": "c"}'}, tools) is None
    assert validate_call({"name": "g", "arguments": {}}, tools) == "unknown_tool"
    assert validate_call({"name": "f", "arguments": "not json"}, tools) == "arguments_not_object"
    assert validate_call({"name": "f", "arguments": {"n": "1"}}, tools).startswith("schema: '1' is not of type")
    assert validate_call({"name": "f", "arguments": {"n": 1, "unit": "k"}}, tools).startswith("schema:")
    assert validate_call({"name": "f", "arguments": {"n": 1, "x": 0}}, tools).startswith("schema:")
    assert validate_call({"name": "f", "arguments": {}}, tools) == "schema: 'n' is a required property"
    (tmp_path / "bad.json").write_text(json.dumps([{"function": {"name": "f", "parameters": {"type": "nope"}}}]))
    with pytest.raises(ConfigError, match="not a JSON Schema"):
        load_tools(tmp_path / "bad.json")
