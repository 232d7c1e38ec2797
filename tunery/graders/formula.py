"""The multi grader's `calculate_output`: a formula over sub-grader scores, never passed to eval().

Python's parser reads it (with `^` turned into `**`, so `^` binds tighter than `*` and is
right-associative, as in math); a whitelist walk then allows only numbers, the sub-graders' names,
`+ - * / ^`, parentheses and the functions min max abs floor ceil exp sqrt log. Numbers are floats,
so `10^10^10` overflows at once instead of building a huge integer.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from tunery.errors import TuneryError

FUNCTIONS: dict[str, tuple[Callable[..., float], int, int]] = {  # name -> (function, min args, max args)
    "min": (lambda *args: min(args), 1, 64),
    "max": (lambda *args: max(args), 1, 64),
    "abs": (abs, 1, 1),
    "floor": (math.floor, 1, 1),
    "ceil": (math.ceil, 1, 1),
    "exp": (math.exp, 1, 1),
    "sqrt": (math.sqrt, 1, 1),
    "log": (math.log, 1, 2),  # natural log; log(x, base)
}
_BINARY: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.Pow: math.pow,  # a ValueError, not a complex number, for (-8) ^ 0.5
}
HELP = "use numbers, the sub-grader names, + - * / ^, parentheses and min max abs floor ceil exp sqrt log"
MAX_DEPTH = 64  # operations inside operations: `a + a + ... + a` of 990 terms passed a check and then
# overflowed the evaluator's recursion


@dataclass(frozen=True)
class Formula:
    text: str
    tree: ast.Expression

    def __call__(self, values: dict[str, float]) -> float:
        """The formula's value; ArithmeticError or ValueError when it is undefined (x/0, log(0), overflow).

        >>> parse_formula("0.5 * a + b ^ 2 / 4", ["a", "b"])({"a": 1.0, "b": 2.0})
        1.5
        """
        value = float(_evaluate(self.tree.body, values))
        if not math.isfinite(value):
            raise ArithmeticError(f"the formula gave {value}")
        return value


def parse_formula(text: str, names: list[str], path: str = "calculate_output") -> Formula:
    """Check `text` once; every problem is a TuneryError naming `path` and what is allowed."""
    if not isinstance(text, str) or not text.strip():
        raise TuneryError(f"{path}: must be a formula string, e.g. '0.5 * a + 0.5 * b'; {HELP}")
    if len(text) > 10_000:
        raise TuneryError(f"{path}: the formula is {len(text)} characters long; keep it under 10,000")
    try:
        tree = ast.parse(text.replace("^", "**").strip(), mode="eval")
        _check_node(tree.body, text, set(names), path)
    except SyntaxError as exc:
        where = f" at column {exc.offset}" if exc.offset else ""
        raise TuneryError(f"{path}: cannot parse '{text}'{where}; {HELP}") from None
    except (RecursionError, MemoryError, ValueError):
        raise TuneryError(
            f"{path}: cannot parse '{text[:80]}': too deeply nested or not text; {HELP}"
        ) from None
    return Formula(text, tree)


def _check_node(node: ast.AST, text: str, names: set[str], path: str, depth: int = 0) -> None:
    if depth > MAX_DEPTH:
        raise TuneryError(
            f"{path}: the formula nests more than {MAX_DEPTH} operations inside each other; "
            "use fewer terms, or min()/max() over many"
        )
    depth += 1
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise TuneryError(f"{path}: '{text}' holds {node.value!r}, which is not a number; {HELP}")
    elif isinstance(node, ast.Name):
        if node.id in FUNCTIONS and node.id not in names:
            raise TuneryError(f"{path}: '{node.id}' is a function: call it, e.g. {node.id}(a)")
        if node.id not in names:
            known = ", ".join(sorted(names)) or "none"
            raise TuneryError(f"{path}: unknown name '{node.id}' in '{text}'; the sub-graders are: {known}")
    elif isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS or node.keywords:
            raise TuneryError(f"{path}: '{ast.unparse(node)}' is not an allowed call; {HELP}")
        _, low, high = FUNCTIONS[node.func.id]
        if not low <= len(node.args) <= high:
            want = str(low) if low == high else f"{low} to {high}"
            raise TuneryError(f"{path}: {node.func.id}() takes {want} arguments, not {len(node.args)}")
        for arg in node.args:
            _check_node(arg, text, names, path, depth)
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        _check_node(node.left, text, names, path, depth)
        _check_node(node.right, text, names, path, depth)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.UAdd | ast.USub):
        _check_node(node.operand, text, names, path, depth)
    else:
        raise TuneryError(f"{path}: '{ast.unparse(node)}' is not allowed in a formula; {HELP}")


def _evaluate(node: ast.AST, values: dict[str, float]) -> Any:
    if isinstance(node, ast.Constant):
        return float(cast(float, node.value))
    if isinstance(node, ast.Name):
        return float(values[node.id])
    if isinstance(node, ast.BinOp):
        return _BINARY[type(node.op)](_evaluate(node.left, values), _evaluate(node.right, values))
    if isinstance(node, ast.UnaryOp):
        operand = _evaluate(node.operand, values)
        return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.Call):
        assert isinstance(node.func, ast.Name)
        function = FUNCTIONS[node.func.id][0]
        return float(function(*(_evaluate(arg, values) for arg in node.args)))
    raise AssertionError(f"unchecked node {ast.dump(node)}")
