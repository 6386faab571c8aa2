"""The calculator the chat model learns to call, and the token protocol around it.

The assistant writes an expression between tool tokens; whoever decodes (``finetune.eval``, the serving engine)
evaluates it and feeds the result back as forced tokens, and the model goes on:

    <|assistant_start|> <|tool_start|> 23+45 <|tool_end|> <|output_start|> 68 <|output_end|> 68 <|assistant_end|>
                        \\______ sampled, learned in SFT ______/ \\_____ forced, masked out ______/

The evaluator walks Python's AST of the expression and allows only numbers, + - * / // % ** and parentheses, with
bounds on the text, the number of operations, exponents and digits, so every call finishes in microseconds. It never
uses eval and never raises: a bad expression gives a result that starts with "error:", which the model reads.
"""

from __future__ import annotations

import ast
import math
import operator
from dataclasses import dataclass

MAX_CHARS = 200  # of the expression
MAX_NODES = 100  # AST nodes: numbers and operations
MAX_DIGITS = 30  # of any integer, operand, intermediate or result
MAX_EXPONENT = 200
MAX_CALL_TOKENS = 64  # a call still open after this many tokens is closed by the decoder
TOOL_TOKENS = ("<|tool_start|>", "<|tool_end|>", "<|output_start|>", "<|output_end|>")

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class CalculatorError(ValueError):
    pass


def _checked(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):  # e.g. complex from (-8) ** 0.5
        raise CalculatorError("the result is not a real number")
    if isinstance(value, float) and not (math.isfinite(value) and abs(value) < 10.0**MAX_DIGITS):
        raise CalculatorError("number too large")
    if isinstance(value, int) and abs(value) >= 10**MAX_DIGITS:
        raise CalculatorError(f"number longer than {MAX_DIGITS} digits")
    return value


def _value(node: ast.AST):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _checked(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _checked(_UNARY[type(node.op)](_value(node.operand)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:  # operands are bounded, so this bounds time
            raise CalculatorError(f"exponent larger than {MAX_EXPONENT}")
        try:
            return _checked(_BINARY[type(node.op)](left, right))
        except ZeroDivisionError:
            raise CalculatorError("division by zero") from None
        except OverflowError:
            raise CalculatorError("number too large") from None
    raise CalculatorError("only numbers, + - * / // % ** and parentheses are allowed")


def _text(value) -> str:
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else f"{value:.10g}"
    return str(value)


def calculate(expression: str) -> str:
    """The value of an arithmetic expression as text ("7/2" -> "3.5", "2**10" -> "1024"), or "error: ..."."""
    text = expression.strip().replace("×", "*").replace("÷", "/")
    if not text:
        return "error: empty expression"
    if len(text) > MAX_CHARS:
        return f"error: expression longer than {MAX_CHARS} characters"
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return "error: not an arithmetic expression"
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        return f"error: more than {MAX_NODES} numbers and operations"
    try:
        return _text(_value(tree.body))
    except CalculatorError as e:
        return f"error: {e}"


@dataclass
class Exchange:
    """One finished call: what the model asked, what it got, and the tokens to feed it next."""

    expression: str
    result: str
    forced: list[int]


class ToolUse:
    """The calculator protocol for one sequence being decoded. Feed ``after`` every token the model emits; when a call
    closes it returns the Exchange whose ``forced`` tokens (the result block) the decoder feeds in before sampling
    again. Tokenizers without the tool tokens make this a no-op."""

    def __init__(self, tok) -> None:
        ids = [tok.special_tokens.get(name) for name in TOOL_TOKENS]
        self.ids = None if None in ids else ids
        self.tok = tok
        self.call: list[int] | None = None  # tokens of the open call

    def after(self, token: int) -> Exchange | None:
        if self.ids is None:
            return None
        start, end, out_start, out_end = self.ids
        if self.call is None:
            if token == start:
                self.call = []
            return None
        if token != end and len(self.call) < MAX_CALL_TOKENS:
            self.call.append(token)
            return None
        expression = self.tok.decode(self.call)
        result = calculate(expression) if token == end else "error: call too long"
        self.call = None
        forced = ([] if token == end else [end]) + [out_start, *self.tok.encode(result), out_end]
        return Exchange(expression, result, forced)
