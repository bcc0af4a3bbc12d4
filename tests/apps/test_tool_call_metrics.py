"""The MCP tool-call metrics on literal calls, following the nesting rules of MiniCPM4-MCP's eval_scripts.py."""

from minicpm4.apps.tool_call_metrics import accuracies, normalize_value, pick_call, score_call

TRUTH = {"name": "write_file", "arguments": {"path": "Reports/Q3.txt", "content": "hello", "overwrite": True}}


def levels(predicted, truth=TRUTH):
    s = score_call(predicted, truth)
    return s["function_name"], s["argument_names"], s["argument_values"]


def test_normalisation_of_values():
    assert normalize_value("3.50") == 3.5 and normalize_value("7") == 7 and normalize_value(" 7") == 7
    assert normalize_value("TRUE") is True and normalize_value("false") is False
    assert normalize_value("  Hello World ") == "hello world"
    assert normalize_value([1, "A"]) == [1, "A"]  # only strings are normalised
    assert normalize_value(5) == normalize_value("5.0")  # 5 == 5.0


def test_exact_call_passes_every_level():
    assert levels([{"name": "write_file", "arguments": {"overwrite": "true", "content": "HELLO ",
                                                        "path": "reports/q3.txt"}}]) == (True, True, True)


def test_levels_nest():
    assert levels([{"name": "read_file", "arguments": dict(TRUTH["arguments"])}]) == (False, False, False)
    # an extra or a missing argument fails the name set, and with it the values
    extra = {**TRUTH["arguments"], "mode": "w"}
    assert levels([{"name": "write_file", "arguments": extra}]) == (True, False, False)
    missing = {"path": "reports/q3.txt", "content": "hello"}
    assert levels([{"name": "write_file", "arguments": missing}]) == (True, False, False)
    wrong = {**TRUTH["arguments"], "content": "hello!"}
    assert levels([{"name": "write_file", "arguments": wrong}]) == (True, True, False)
    flipped = {**TRUTH["arguments"], "overwrite": False}
    assert levels([{"name": "write_file", "arguments": flipped}]) == (True, True, False)


def test_no_prediction_is_wrong_at_every_level():
    assert levels(None) == (False, False, False)
    assert levels([]) == (False, False, False)


def test_the_call_with_the_right_name_is_scored_else_the_first():
    right = {"name": "write_file", "arguments": dict(TRUTH["arguments"])}
    other = {"name": "list_directory", "arguments": {"path": "/"}}
    assert pick_call([other, right], TRUTH) is right
    assert levels([other, right]) == (True, True, True)
    first = {"name": "read_file", "arguments": {"path": "a"}}
    assert pick_call([first, other], TRUTH) is first


def test_accuracies_are_percent_over_steps():
    truth = {"name": "add", "arguments": {"a": 2, "b": 3}}
    predictions = [[truth], [{"name": "add", "arguments": {"a": 2, "b": 4}}], [{"name": "add", "arguments": {"a": 2}}],
                   None]
    scores = [score_call(p, truth) for p in predictions]
    assert accuracies(scores) == {"function_name": 75.0, "argument_names": 50.0, "argument_values": 25.0, "steps": 4}
    assert accuracies([]) == {"function_name": 0.0, "argument_names": 0.0, "argument_values": 0.0, "steps": 0}
