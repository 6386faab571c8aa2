"""The calculator: its evaluator against Python's own arithmetic, hostile input, the decoding protocol, and how a
call renders in the chat format (learned call, masked result)."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finetune import calculator
from finetune.calculator import ToolUse, calculate
from finetune.chat import ChatFormatError, render_conversation, validate_messages
from finetune.eval import answer_text
from finetune.tasks import generate
from tokenizer import Tokenizer

OPS = ["+", "-", "*", "/", "//", "%", "**"]


@st.composite
def expressions(draw, depth=3):
    """Well-formed expressions of small integers and decimals, the operators and parentheses."""
    if depth == 0 or draw(st.booleans()):
        number = draw(st.one_of(st.integers(0, 10**6), st.decimals(0, 1000, places=2).map(str)))
        return str(number)
    left, right = draw(expressions(depth - 1)), draw(expressions(depth - 1))
    text = f"{left} {draw(st.sampled_from(OPS))} {right}"
    return f"({text})" if draw(st.booleans()) else text


def python_value(text: str) -> str:
    """Python's arithmetic on a generated (so trusted) expression, formatted the calculator's way, or 'error'."""
    try:
        value = eval(text, {"__builtins__": {}})  # noqa: S307 -- only on expressions this test generated
    except (ZeroDivisionError, OverflowError):
        return "error"
    if isinstance(value, complex) or abs(value) >= 10**calculator.MAX_DIGITS or value != value:
        return "error"
    return calculator._text(value)


@settings(max_examples=300, deadline=None)
@given(expressions())
def test_agrees_with_python_arithmetic(text):
    want = python_value(text) if "**" not in text else None  # big powers: bounded by us, not by Python
    got = calculate(text)
    if want is None:
        assert got.startswith("error:") or got == python_value(text)
    elif want == "error":
        assert got.startswith("error:")
    elif not got.startswith("error:"):  # an intermediate value may exceed the digit bound where the end does not
        assert got == want


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=300))
def test_any_text_gives_a_string_and_never_raises(text):
    assert isinstance(calculate(text), str)


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os').system('true')",
        "open('/etc/passwd')",
        "x",
        "[1, 2]",
        "(1).real",
        "lambda: 1",
        "1 if 1 else 2",
        "1 < 2",
        "'a' * 3",
        "True + 1",
        "9**9**9**9",
        "10**10**10",
        "2**1000",
        "(10**29)**200",
        "1e308 * 10",
        "(-8) ** 0.5",
        "1/0",
        "5 % 0",
        "(" * 150 + "1" + ")" * 150,
        "+".join(["1"] * 200),
        "1" * 31,
        "",
    ],
)
def test_hostile_inputs_get_an_error_result_quickly(text):
    t0 = time.perf_counter()
    assert calculate(text).startswith("error:")
    assert time.perf_counter() - t0 < 0.5


@pytest.mark.parametrize(
    "text, want",
    [
        ("23+45", "68"),
        ("7 / 2", "3.5"),
        ("2**10", "1024"),
        ("12 × 3", "36"),
        ("-(4 - 10) % 4", "2"),
        ("9 // 2", "4"),
        ("0.1 + 0.2", "0.3"),
        ("2.5*4", "10"),
    ],
)
def test_values(text, want):
    assert calculate(text) == want


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["What is 23 + 45? It is 68. " * 20], vocab_size=300)


def feed(tool: ToolUse, ids: list[int]):
    return [e for t in ids if (e := tool.after(t))]


def test_tool_use_returns_the_result_block_when_a_call_closes(tok):
    sp = tok.special_tokens
    tool = ToolUse(tok)
    assert feed(tool, tok.encode("23+45")) == []  # text outside a call is nobody's business
    (ex,) = feed(tool, [sp["<|tool_start|>"], *tok.encode("23+45"), sp["<|tool_end|>"]])
    assert (ex.expression, ex.result) == ("23+45", "68")
    assert ex.forced == [sp["<|output_start|>"], *tok.encode("68"), sp["<|output_end|>"]]
    # A call that never closes is closed for the model, with an error it can read.
    (ex,) = feed(tool, [sp["<|tool_start|>"]] + tok.encode("1") * (calculator.MAX_CALL_TOKENS + 1))
    assert ex.result.startswith("error:") and ex.forced[:2] == [sp["<|tool_end|>"], sp["<|output_start|>"]]


def test_a_call_renders_learned_and_its_result_masked(tok):
    sp = tok.special_tokens
    convo = [
        {"role": "user", "content": "What is 23 + 45?"},
        {
            "role": "assistant",
            "content": "It is 68.",
            "calculator_calls": [{"expression": "23+45", "result": "68", "offset": 6}],
        },
    ]
    ids, mask = render_conversation(tok, convo)
    start = ids.index(sp["<|assistant_start|>"]) + 1
    body = tok.encode("It is ")
    call = [sp["<|tool_start|>"], *tok.encode("23+45"), sp["<|tool_end|>"]]
    result = [sp["<|output_start|>"], *tok.encode("68"), sp["<|output_end|>"]]
    rest = tok.encode("68.")
    assert ids[start:] == body + call + result + rest + [sp["<|assistant_end|>"]]
    assert mask[start:] == [1] * len(body + call) + [0] * len(result) + [1] * (len(rest) + 1)
    # What the decoder produced reads back as the prose alone.
    assert answer_text(tok, ids[start:]) == "It is 68."
    assert answer_text(tok, ids[start:], show_calls=True) == "It is [calculator: 23+45 = 68]68."


@pytest.mark.parametrize(
    "calls",
    [
        [{"expression": "1", "result": "1", "offset": 99}],
        [{"expression": 1, "result": "1", "offset": 0}],
        [{"expression": "1", "result": "1", "offset": 2}, {"expression": "1", "result": "1", "offset": 1}],
        "1+1",
        [{"expression": "1", "result": "1", "offset": 0}] * 17,
    ],
)
def test_bad_calls_are_refused(calls):
    convo = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "abc", "calculator_calls": calls}]
    with pytest.raises(ChatFormatError, match="calculator"):
        validate_messages(convo)
    with pytest.raises(ChatFormatError, match="only assistant"):
        validate_messages([{"role": "user", "content": "hi", "calculator_calls": [calls]}])


def test_training_items_call_the_calculator_with_the_right_expression():
    for task in ("arithmetic", "word_problem"):
        for item in generate(task, "train", 50, 0):
            (call,) = item.messages(tool=True)[1]["calculator_calls"]
            assert call["result"] == item.answer and call["offset"] == 0
            assert "calculator_calls" not in item.messages(tool=False)[1]
