"""The calculator MCP server: arithmetic on numbers, and arithmetic expressions read with `ast` (never eval'd).

    python -m minicpm4.apps.mcp_servers.calculator
"""

from __future__ import annotations

import ast
import math
import operator

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

server = MCPServer("calculator", log_level="WARNING")

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_MAX_EXPONENT = 1000  # 10**10**10 would hang the server; a bound keeps every expression cheap


def _number(x: float) -> float | int:
    """Whole results as ints (2 + 3 = 5, not 5.0), others as floats."""
    return int(x) if isinstance(x, float) and x.is_integer() and abs(x) < 2 ** 53 else x


@server.tool()
def add(a: float, b: float) -> float:
    """Add two numbers."""
    return _number(a + b)


@server.tool()
def subtract(a: float, b: float) -> float:
    """Subtract b from a."""
    return _number(a - b)


@server.tool()
def multiply(a: float, b: float) -> float:
    """Multiply two numbers."""
    return _number(a * b)


@server.tool()
def divide(a: float, b: float) -> float:
    """Divide a by b."""
    if b == 0:
        raise ToolError("division by zero")
    return _number(a / b)


@server.tool()
def power(base: float, exponent: float) -> float:
    """Raise base to the power exponent."""
    if abs(exponent) > _MAX_EXPONENT:
        raise ToolError(f"exponent {exponent} is too large (at most {_MAX_EXPONENT} in magnitude)")
    return _number(base ** exponent)


@server.tool()
def square_root(x: float) -> float:
    """The square root of a non-negative number."""
    if x < 0:
        raise ToolError(f"square root of a negative number ({x})")
    return _number(math.sqrt(x))


@server.tool()
def round_number(x: float, digits: int = 0) -> float:
    """Round x to the given number of decimal digits."""
    return _number(round(x, digits))


@server.tool()
def evaluate(expression: str) -> float:
    """Evaluate an arithmetic expression with + - * / // % ** and parentheses, e.g. "(2 + 3) * 4"."""
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError:
        raise ToolError(f"not an arithmetic expression: {expression!r}") from None
    return _number(_eval(tree.body))


def _eval(node: ast.expr) -> float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > _MAX_EXPONENT:
            raise ToolError(f"exponent {right} is too large (at most {_MAX_EXPONENT} in magnitude)")
        try:
            return _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ToolError("division by zero") from None
    raise ToolError(f"unsupported element in expression: {ast.unparse(node)!r}")


if __name__ == "__main__":
    server.run("stdio")
