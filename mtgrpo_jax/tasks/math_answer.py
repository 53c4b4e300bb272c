"""MATH-style boxed answers: equivalence after normalising the usual LaTeX noise.

A reasonable subset of the well-known MATH normalisation (fractions, \\left/\\right, \\text and units,
dollars, degrees, percent, spacing, thousands separators, `x = 5`), plus exact numeric comparison of
plain numbers and integer fractions (`5.0` equals `5`, `0.5` equals `\\frac{1}{2}`). Nothing is
evaluated symbolically: numbers are parsed by a bounded regular expression, never by `Fraction(str)`
(which would expand `1e999999999`) or sympy.
"""

from __future__ import annotations

import dataclasses
import re
from fractions import Fraction
from typing import Any, ClassVar, Mapping

from mtgrpo_jax.tasks.base import BaseTask, target_string

MAX_ANSWER_CHARS = 1024
_MAX_NUMBER_DIGITS = 40

_SPACING = ("\\,", "\\;", "\\:", "\\!", "\\ ", "~", "\\quad", "\\qquad")
_NUMBER_RE = re.compile(r"^([+-]?)(\d{1,%d})(?:\.(\d{0,%d}))?$" % (_MAX_NUMBER_DIGITS, _MAX_NUMBER_DIGITS))
_DOT_NUMBER_RE = re.compile(r"^([+-]?)\.(\d{1,%d})$" % _MAX_NUMBER_DIGITS)
_THOUSANDS_RE = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d+)?$")
_SIMPLE_FRAC_RE = re.compile(r"^([+-]?)\\frac\{([+-]?\d{1,40})\}\{([+-]?\d{1,40})\}$")
_SLASH_FRAC_RE = re.compile(r"^([+-]?\d{1,40})/(\d{1,40})$")
_CHOICE_RE = re.compile(r"^\(([A-Ea-e])\)$")
_WRAPPER_RE = re.compile(r"\\(?:text(?:bf|it|rm)?|math(?:rm|bf)|mbox|operatorname)\{([^{}]*)\}")
_UNIT_TEXT_RE = re.compile(r"\s*\\(?:text|mbox|mathrm)\{\s+[^{}]*\}\s*$")


def _unwrap_commands(s: str) -> str:
    """`\\text{abc}` -> `abc`, innermost first; a few regex passes, so nesting costs no Python loop."""
    for _ in range(8):
        unwrapped = _WRAPPER_RE.sub(r"\1", s)
        if unwrapped == s:
            break
        s = unwrapped
    return s


def _fix_fracs(s: str) -> str:
    """`\\frac12` -> `\\frac{1}{2}`, `\\frac1{2}` -> `\\frac{1}{2}`."""
    parts = s.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        out += "\\frac"
        if part.startswith("{") or len(part) < 2:
            out += part
            continue
        a, b, rest = part[0], part[1], part[2:]
        if b == "{":
            out += "{" + a + "}" + b + rest
        else:
            out += "{" + a + "}{" + b + "}" + rest
    return out


def _fix_sqrt(s: str) -> str:
    """`\\sqrt3` -> `\\sqrt{3}`."""
    return re.sub(r"\\sqrt([^{\[\\\s])", r"\\sqrt{\1}", s)


def normalize_answer(answer: str) -> str | None:
    """A canonical string for a MATH-style answer, or None when it is too long to read."""
    if not isinstance(answer, str) or len(answer) > MAX_ANSWER_CHARS:
        return None
    s = answer.strip()
    s = s.replace("\n", "").replace("\\!", "")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("°", "")
    s = s.replace("\\$", "").replace("$", "")
    s = _UNIT_TEXT_RE.sub("", s)  # "5.4 \text{ cents}" -> "5.4"
    s = _unwrap_commands(s)
    s = s.replace("\\%", "").replace("%", "")
    for spacing in _SPACING:
        s = s.replace(spacing, " ")
    s = s.replace("\\displaystyle", "")
    s = s.strip().rstrip(".").strip()
    # "x = 5", "k=5": keep the value when the left side is a short variable name.
    if s.count("=") == 1:
        lhs, rhs = s.split("=")
        if len(lhs.strip()) <= 2:
            s = rhs.strip()
    s = _fix_sqrt(s)
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    choice = _CHOICE_RE.match(s)
    if choice:
        s = choice.group(1).upper()
    slash = _SLASH_FRAC_RE.match(s)
    if slash:
        s = f"\\frac{{{slash.group(1)}}}{{{slash.group(2)}}}"
    return s


def numeric_value(s: str) -> Fraction | None:
    """Exact value of a normalised plain number or integer fraction; None for anything else."""
    match = _NUMBER_RE.match(s)
    if match:
        sign, whole, frac = match.groups()
        frac = frac or ""
        value = Fraction(int(whole + frac), 10 ** len(frac)) if frac else Fraction(int(whole))
        return -value if sign == "-" else value
    match = _DOT_NUMBER_RE.match(s)
    if match:
        sign, frac = match.groups()
        value = Fraction(int(frac), 10 ** len(frac))
        return -value if sign == "-" else value
    match = _SIMPLE_FRAC_RE.match(s)
    if match:
        sign, num, den = match.groups()
        if int(den) == 0:
            return None
        value = Fraction(int(num), int(den))
        return -value if sign == "-" else value
    return None


def answers_equivalent(answer: str, reference: str) -> bool:
    a, b = normalize_answer(answer), normalize_answer(reference)
    if a is None or b is None:
        return False
    if a == b:
        return True
    va, vb = numeric_value(a), numeric_value(b)
    return va is not None and vb is not None and va == vb


@dataclasses.dataclass
class MathTask(BaseTask):
    """MATH-style problems with a boxed final answer (the released math parquet layout)."""

    family: ClassVar[str] = "math"

    def prompt_body(self, example: Mapping[str, Any]) -> str:
        return f"{example['question']} Put your final answer within \\boxed{{}}. "

    def check(self, answer: str, example: Mapping[str, Any]) -> bool:
        return answers_equivalent(answer, target_string(example))

    def reference_answer(self, example: Mapping[str, Any]) -> str:
        return target_string(example).strip()
