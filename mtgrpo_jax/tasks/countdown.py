"""Countdown: combine the given integers with + - * / and parentheses to reach a target.

The answer is checked without `eval`: a hand-written tokenizer and recursive-descent parser accept
only ASCII integers, the four operators (binary, and unary +/- as Python's eval did in the released
verifier), parentheses and whitespace. Length, token, literal and nesting limits bound the work, and
values are exact `Fraction`s, so `1/3*3` equals 1 and division by zero is simply a wrong answer.
`**`, `//`, names, calls, attributes, decimals or unicode digits are not valid expressions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from typing import Any, ClassVar

from mtgrpo_jax.tasks.base import answer_field, demonstration_text
from mtgrpo_jax.tasks.reasoning_gym import ReasoningGymTask

MAX_EXPRESSION_CHARS = 512
MAX_TOKENS = 160
MAX_DEPTH = 32  # parentheses and unary signs together
MAX_LITERAL_DIGITS = 12

_OPERATORS = frozenset("+-*/()")
_WHITESPACE = frozenset(" \t\r\n")


class ExpressionError(ValueError):
    """The text is not a valid countdown expression."""


def tokenize(text: str) -> list[tuple[str, int | None]]:
    """Split an expression into ("num", value) and (operator, None) tokens."""
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    tokens: list[tuple[str, int | None]] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in _WHITESPACE:
            i += 1
        elif "0" <= ch <= "9":  # ASCII only: str.isdigit would accept '²' and other scripts' digits
            j = i
            while j < n and "0" <= text[j] <= "9":
                j += 1
            literal = text[i:j]
            if len(literal) > MAX_LITERAL_DIGITS:
                raise ExpressionError("integer literal too long")
            if len(literal) > 1 and literal[0] == "0":
                raise ExpressionError("integer literal with a leading zero")
            tokens.append(("num", int(literal)))
            i = j
        elif ch in _OPERATORS:
            tokens.append((ch, None))
            i += 1
        else:
            raise ExpressionError(f"unexpected character {ch!r}")
        if len(tokens) > MAX_TOKENS:
            raise ExpressionError(f"more than {MAX_TOKENS} tokens")
    if not tokens:
        raise ExpressionError("empty expression")
    return tokens


class _Parser:
    """expr := term (('+'|'-') term)* ; term := factor (('*'|'/') factor)* ;
    factor := ('+'|'-') factor | INT | '(' expr ')'"""

    def __init__(self, tokens: list[tuple[str, int | None]]):
        self.tokens = tokens
        self.pos = 0
        self.depth = 0
        self.literals: list[int] = []

    def peek(self) -> str | None:
        return self.tokens[self.pos][0] if self.pos < len(self.tokens) else None

    def parse(self) -> Fraction:
        value = self.expr()
        if self.pos != len(self.tokens):
            raise ExpressionError(f"unexpected token {self.peek()!r}")
        return value

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            op = self.tokens[self.pos][0]
            self.pos += 1
            rhs = self.term()
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(self) -> Fraction:
        value = self.factor()
        while self.peek() in ("*", "/"):
            op = self.tokens[self.pos][0]
            self.pos += 1
            rhs = self.factor()
            if op == "*":
                value = value * rhs
            else:
                value = value / rhs  # ZeroDivisionError: a wrong answer, handled by the caller
        return value

    def factor(self) -> Fraction:
        kind = self.peek()
        if kind is None:
            raise ExpressionError("expression ends early")
        if kind in ("+", "-", "("):
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise ExpressionError(f"nesting deeper than {MAX_DEPTH}")
            self.pos += 1
            if kind == "(":
                value = self.expr()
                if self.peek() != ")":
                    raise ExpressionError("unbalanced parentheses")
                self.pos += 1
            else:
                value = self.factor()
                value = -value if kind == "-" else value
            self.depth -= 1
            return value
        if kind == "num":
            literal = self.tokens[self.pos][1]
            self.pos += 1
            self.literals.append(int(literal))
            return Fraction(literal)
        raise ExpressionError(f"unexpected token {kind!r}")


def evaluate_expression(text: str) -> tuple[Fraction, list[int]]:
    """Exact value of an expression and the integer literals it uses, in order.

    Raises ExpressionError for text that is not an expression and ZeroDivisionError for a division
    by zero.
    """
    parser = _Parser(tokenize(text))
    return parser.parse(), parser.literals


def countdown_answer(example: Mapping[str, Any]) -> tuple[list[int], int]:
    """(numbers, target) of an example: accepts `load_examples` output (numbers as a list) and raw
    released rows (numbers as "8,73,96")."""
    answer = answer_field(example)
    numbers = answer["numbers"]
    if isinstance(numbers, str):
        numbers = [int(part) for part in numbers.split(",") if part.strip()]
    return [int(x) for x in numbers], int(answer["target"])


def is_correct_expression(text: str, numbers: Sequence[int], target: int) -> bool:
    """Each given number used exactly once and the exact value equal to the target."""
    try:
        value, literals = evaluate_expression(text)
    except (ExpressionError, ZeroDivisionError):
        return False
    return sorted(literals) == sorted(numbers) and value == target


# --- solver (demonstrations) ----------------------------------------------------------------------
# Search runs on floats with expression trees as nested tuples (int leaf or (op, left, right)); only
# a candidate that hits the target is rendered and checked exactly, so rounding can never produce a
# wrong demonstration.
_Tree = Any
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


def _apply(op: str, a: Fraction, b: Fraction) -> Fraction:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return a / b


def _exact(tree: _Tree) -> Fraction:
    if isinstance(tree, int):
        return Fraction(tree)
    op, left, right = tree
    return _apply(op, _exact(left), _exact(right))


def _render(tree: _Tree) -> tuple[str, int]:
    """(text, precedence) with only the parentheses the grammar needs."""
    if isinstance(tree, int):
        return str(tree), 3
    op, left, right = tree
    (lt, lp), (rt, rp) = _render(left), _render(right)
    prec = _PRECEDENCE[op]
    if lp < prec:
        lt = f"({lt})"
    if rp < prec or (rp == prec and op in "-/"):
        rt = f"({rt})"
    return f"{lt} {op} {rt}", prec


def _fmt(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def _steps(tree: _Tree, out: list[str]) -> Fraction:
    """Post-order arithmetic steps ("a op b = c") of a tree; returns its exact value."""
    if isinstance(tree, int):
        return Fraction(tree)
    op, left, right = tree
    a, b = _steps(left, out), _steps(right, out)
    value = _apply(op, a, b)
    out.append(f"{_fmt(a)} {op} {_fmt(b)} = {_fmt(value)}")
    return value


def _pairs(a: float, ta: _Tree, b: float, tb: _Tree) -> list[tuple[float, _Tree]]:
    out = [(a + b, ("+", ta, tb)), (a * b, ("*", ta, tb)), (a - b, ("-", ta, tb)), (b - a, ("-", tb, ta))]
    if b != 0:
        out.append((a / b, ("/", ta, tb)))
    if a != 0:
        out.append((b / a, ("/", tb, ta)))
    return out


def _key(value: float) -> float:
    return round(value, 9)


def _reach(items: list[tuple[float, _Tree]]) -> dict[float, tuple[float, _Tree]]:
    """Every value of an expression over all of 1-3 items (one tree per value)."""
    if len(items) == 1:
        return {_key(items[0][0]): items[0]}
    if len(items) == 2:
        return {_key(v): (v, t) for v, t in _pairs(*items[0], *items[1])}
    out: dict[float, tuple[float, _Tree]] = {}
    for i in range(3):
        x = items[i]
        for v, t in _reach([items[j] for j in range(3) if j != i]).values():
            for value, tree in _pairs(*x, v, t):
                out.setdefault(_key(value), (value, tree))
    return out


def _complements(x: float, tx: _Tree, goal: float) -> list[tuple[float, Callable[[_Tree], _Tree]]]:
    """(y, build) such that `x op y` (or `y op x`) equals goal, for the six operations."""
    out = [
        (goal - x, lambda ty: ("+", tx, ty)),
        (x - goal, lambda ty: ("-", tx, ty)),
        (goal + x, lambda ty: ("-", ty, tx)),
        (goal * x, lambda ty: ("/", ty, tx)),
    ]
    if x != 0:
        out.append((goal / x, lambda ty: ("*", tx, ty)))
    if goal != 0:
        out.append((x / goal, lambda ty: ("/", tx, ty)))
    return out


def solve_countdown(numbers: Sequence[int], target: int, *, max_states: int = 200_000) -> tuple[str, list[str]] | None:
    """An expression using each number once that equals the target, with its arithmetic steps, or
    None when none exists (or the search budget of visited value-multisets runs out).

    Depth-first over "replace two values by their combination" down to four values (skipping value
    multisets already explored); four values are settled directly: every expression over them splits
    at the top into 1+3 or 2+2 items, so the target is looked up among the values of one side for
    each value of the other.
    """
    numbers = [int(x) for x in numbers]
    if not numbers:
        return None
    goal = Fraction(int(target))
    fgoal = float(goal)
    seen: set[tuple[float, ...]] = set()
    budget = [max_states]

    def exact_hit(tree: _Tree) -> bool:
        try:
            return _exact(tree) == goal
        except ZeroDivisionError:
            return False

    def settle(items: list[tuple[float, _Tree]]) -> _Tree | None:
        n = len(items)
        if n <= 3:
            hit = _reach(items).get(_key(fgoal))
            return hit[1] if hit is not None and exact_hit(hit[1]) else None
        splits = [([i], [j for j in range(4) if j != i]) for i in range(4)]
        splits += [([0, j], [k for k in range(1, 4) if k != j]) for j in range(1, 4)]
        for left, right in splits:
            right_values = _reach([items[j] for j in right])
            for x, tx in _reach([items[i] for i in left]).values():
                for y, build in _complements(x, tx, fgoal):
                    hit = right_values.get(_key(y))
                    if hit is not None:
                        tree = build(hit[1])
                        if exact_hit(tree):
                            return tree
        return None

    def search(items: list[tuple[float, _Tree]]) -> _Tree | None:
        if len(items) <= 4:
            return settle(items)
        key = tuple(sorted(_key(v) for v, _ in items))
        if key in seen or budget[0] <= 0:
            return None
        seen.add(key)
        budget[0] -= 1
        n = len(items)
        for i in range(n):
            for j in range(i + 1, n):
                rest = [items[k] for k in range(n) if k != i and k != j]
                for combined in _pairs(*items[i], *items[j]):
                    found = search(rest + [combined])
                    if found is not None:
                        return found
        return None

    tree = search([(float(x), x) for x in numbers])
    if tree is None:
        return None
    steps: list[str] = []
    _steps(tree, steps)
    return _render(tree)[0], steps


@dataclasses.dataclass
class CountdownTask(ReasoningGymTask):
    """reasoning-gym `countdown`; the answer holds `numbers` (list[int]) and `target` (int).

    Levels (the released sets): 3 / 4 / 5 numbers (6 for the held-out level 4), values 1..100,
    targets 1..1000."""

    family: ClassVar[str] = "countdown"
    rg_dataset: ClassVar[str] = "countdown"
    levels: ClassVar[dict[int, dict[str, Any]]] = {
        level: dict(min_numbers=k, max_numbers=k, min_value=1, max_value=100, min_target=1, max_target=1000)
        for level, k in {1: 3, 2: 4, 3: 5, 4: 6}.items()
    }
    solver_max_states: int = 200_000

    # --- data -------------------------------------------------------------------------------------
    def released_question(self, item: dict[str, Any]) -> str:
        numbers = ", ".join(str(x) for x in item["metadata"]["numbers"])
        return (
            f"Using the numbers {numbers} and basic arithmetic operations (+, -, *, /), create an expression "
            f"that equals {item['metadata']['target']}.\nYou need to use each number exactly once.\n"
            "Present the final expression that equals the target number within \\boxed{}. "
            "For example: \\boxed{46+68/(52-50)}\n"
        )

    def ground_truth(self, item: dict[str, Any]) -> dict[str, Any]:
        meta = item["metadata"]
        return {"numbers": ",".join(str(int(x)) for x in meta["numbers"]), "target": int(meta["target"])}

    def parse_answer(self, ground_truth: Any) -> dict[str, Any]:
        numbers = ground_truth["numbers"]
        if isinstance(numbers, str):
            numbers = [int(x) for x in numbers.split(",") if x.strip()]
        return {"numbers": [int(x) for x in numbers], "target": int(ground_truth["target"])}

    @classmethod
    def answer_arrow_type(cls):
        import pyarrow as pa

        return pa.struct([("numbers", pa.string()), ("target", pa.int64())])

    # --- prompts and scoring ----------------------------------------------------------------------

    def prompt_body(self, example: Mapping[str, Any]) -> str:
        numbers, target = countdown_answer(example)
        return (
            f"Using the numbers {numbers}, create an equation that equals {target}. You can only use basic "
            "arithmetic operations (+, -, *, /) and each number should be used exactly once. Return the "
            "final answer in \\boxed{}, for example \\boxed{(1 + 2) / 3}."
        )

    def compact_body(self, example: Mapping[str, Any]) -> str:
        numbers, target = countdown_answer(example)
        return (
            f"Using the numbers {numbers}, make {target} with + - * / and parentheses, using each number "
            "exactly once. Put the final expression in \\boxed{}, for example \\boxed{(1 + 2) / 3}."
        )

    def check(self, answer: str, example: Mapping[str, Any]) -> bool:
        numbers, target = countdown_answer(example)
        return is_correct_expression(answer, numbers, target)

    def _solution(self, example: Mapping[str, Any]) -> tuple[str, list[str]]:
        numbers, target = countdown_answer(example)
        solved = solve_countdown(numbers, target, max_states=self.solver_max_states)
        if solved is None:
            raise ValueError(f"no expression of {numbers} reaches {target} within the solver budget")
        return solved

    def reference_answer(self, example: Mapping[str, Any]) -> str:
        return self._solution(example)[0]

    def demonstration(self, example: Mapping[str, Any]) -> str:
        numbers, target = countdown_answer(example)
        expression, steps = self._solution(example)
        reasoning = (
            f"I need to combine {', '.join(map(str, numbers))} to reach {target}, using each number once.\n"
            + "\n".join(steps)
            + f"\nSo {expression} = {target}."
        )
        return demonstration_text(reasoning, expression, self.demonstration_style)
