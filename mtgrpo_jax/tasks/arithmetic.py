"""Arithmetic: short integer questions ("What is 7 + 5?") a tiny model can partly learn on CPU.

Levels: 1 adds two single digits; 2 adds a single digit to, or subtracts it from, a two-digit number;
3 multiplies two single digits; 4 computes `a * b + c` with a two-digit `c`; 5 subtracts one single digit
from another (100 facts like levels 1 and 3, with negative answers).
Items are generated in pure Python (no reasoning-gym), one `random.Random` per item, so item `i` of
a (seed, level) stream does not depend on which slice is generated.

The boxed answer is read as an integer without `eval`: surrounding whitespace is stripped, then only
an optional leading `-` followed by 1-12 ASCII digits is accepted. Decimals, `+7`, expressions,
unicode digits, or anything longer is a wrong (formatted) answer.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

from mtgrpo_jax.tasks.base import BaseTask, target_string

# Bumped whenever the item stream of a (seed, level) changes, so cached parquet files are regenerated.
GENERATOR_VERSION = 1
MAX_ANSWER_DIGITS = 12

# level -> the operations it draws from and each operand's inclusive range (also hashed into the cache
# fingerprint, so changing a range invalidates previously generated files).
LEVELS: dict[int, dict[str, Any]] = {
    1: {"forms": ["a + b"], "a": [0, 9], "b": [0, 9]},
    2: {"forms": ["a + b", "a - b"], "a": [10, 99], "b": [0, 9]},
    3: {"forms": ["a * b"], "a": [0, 9], "b": [0, 9]},
    4: {"forms": ["a * b + c"], "a": [0, 9], "b": [0, 9], "c": [10, 99]},
    5: {"forms": ["a - b"], "a": [0, 9], "b": [0, 9]},
}

QUESTION_TEMPLATE = "What is {expression}? Give the final answer in \\boxed{{}}."

_INTEGER_RE = re.compile(rf"-?[0-9]{{1,{MAX_ANSWER_DIGITS}}}")  # [0-9] is ASCII only, unlike \d
# The expression of a generated question: integers joined by + - *, single spaces around operators.
_QUESTION_RE = re.compile(r"What is (?P<expression>[0-9]{1,6}(?: [-+*] [0-9]{1,6}){1,3})\?")


def _evaluate(form: str, operands: Mapping[str, int]) -> int:
    a, b = operands["a"], operands["b"]
    if form == "a + b":
        return a + b
    if form == "a - b":
        return a - b
    if form == "a * b":
        return a * b
    if form == "a * b + c":
        return a * b + operands["c"]
    raise ValueError(f"unknown arithmetic form {form!r}")


def arithmetic_item(level: int, rng: random.Random) -> tuple[str, str]:
    """(question, answer) of one item of `level`, drawn from `rng`."""
    if level not in LEVELS:
        raise ValueError(f"arithmetic: level must be one of {sorted(LEVELS)}, got {level!r}")
    spec = LEVELS[level]
    form = rng.choice(spec["forms"])
    operands = {name: rng.randint(*spec[name]) for name in ("a", "b", "c") if name in spec}
    expression = re.sub(r"[abc]", lambda m: str(operands[m.group()]), form)
    return QUESTION_TEMPLATE.format(expression=expression), str(_evaluate(form, operands))


def parse_integer_answer(text: str) -> int | None:
    """The integer a boxed answer states, or None when it is not exactly `-?[0-9]{1,12}` (after
    stripping surrounding whitespace). Never evaluates anything."""
    if not isinstance(text, str):
        return None
    text = text.strip()
    if _INTEGER_RE.fullmatch(text) is None:
        return None
    return int(text)


def _steps(expression: str) -> list[str]:
    """Worked steps for an expression of + - * on integers: products first, then left to right."""
    tokens = expression.split(" ")
    values, ops = [int(tokens[0])], []
    steps = []
    for op, literal in zip(tokens[1::2], tokens[2::2]):
        if op == "*":
            product = values[-1] * int(literal)
            steps.append(f"{values[-1]} * {literal} = {product}")
            values[-1] = product
        else:
            ops.append(op)
            values.append(int(literal))
    total = values[0]
    for op, value in zip(ops, values[1:]):
        result = total + value if op == "+" else total - value
        steps.append(f"{total} {op} {value} = {result}")
        total = result
    return steps


@dataclasses.dataclass
class ArithmeticTask(BaseTask):
    """Integer arithmetic questions; the answer is the integer as a string (`{"target": "12"}` in
    verl rows)."""

    family: ClassVar[str] = "arithmetic"
    levels: ClassVar[dict[int, dict[str, Any]]] = LEVELS
    generator_version: ClassVar[int] = GENERATOR_VERSION

    def generate_items(self, level: int, start: int, stop: int, base_seed: int) -> Iterator[tuple[int, str, Any]]:
        """Item `index` has its own generator, seeded by (index, base_seed) without collisions, so
        slices are independent."""
        for index in range(start, stop):
            question, answer = arithmetic_item(level, random.Random(index * 2**32 + base_seed))
            yield index, question, {"target": answer}

    def check(self, answer: str, example: Mapping[str, Any]) -> bool:
        value = parse_integer_answer(answer)
        return value is not None and value == int(target_string(example).strip())

    def reference_answer(self, example: Mapping[str, Any]) -> str:
        return str(int(target_string(example).strip()))

    def demonstration_reasoning(self, example: Mapping[str, Any]) -> str:
        match = _QUESTION_RE.search(str(example.get("question", "")))
        if match is None:
            return f"I compute the value step by step: it is {self.reference_answer(example)}."
        return "\n".join(_steps(match.group("expression")))
