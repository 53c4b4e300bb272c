"""MATH-style boxed answers: equivalence in two tiers.

1. The safe reader (always, in-process, microseconds): a reasonable subset of the well-known MATH
   normalisation (fractions, \\left/\\right, \\text and units, dollars, degrees, percent, spacing,
   thousands separators, `x = 5`), plus exact numeric comparison of plain numbers and integer fractions
   (`5.0` equals `5`, `0.5` equals `\\frac{1}{2}`). Nothing is evaluated symbolically: numbers are parsed
   by a bounded regular expression, never by `Fraction(str)` (which would expand `1e999999999`) or sympy.
2. When the safe reader says "not equal": `math-verify` (HF's maintained LaTeX -> sympy equivalence:
   set order, `\\sqrt{2}/2` vs `\\frac{\\sqrt{2}}{2}`, `2x+1` vs `1+2x`, `10^{3}` vs `1000`, units, ...).
   Sympy on untrusted input can run for ever or eat memory (`9^{9^{9^9}}`), so it runs in a small pool of
   separate worker processes (address space capped) with a time limit per answer; a worker that runs past
   it is killed and replaced, and the answer keeps the safe reader's verdict. The pool starts on first use
   in the background; until it is up, answers keep the safe reader's verdict too.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import queue
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from fractions import Fraction
from typing import Any, ClassVar

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


def safe_equivalent(answer: str, reference: str) -> bool:
    """The in-process reader alone (tier 1)."""
    a, b = normalize_answer(answer), normalize_answer(reference)
    if a is None or b is None:
        return False
    if a == b:
        return True
    va, vb = numeric_value(a), numeric_value(b)
    return va is not None and vb is not None and va == vb


# --------------------------------------------------------------------------- math-verify worker processes
# Runs as `python -c`: imports math_verify only (not this package), caps its address space, then answers one
# JSON request per line ([answer, reference] -> "1" equivalent, "0" not, "E" could not decide).
_WORKER_SOURCE = r"""
import json, resource, sys
limit = int(sys.argv[1])
if limit > 0:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from math_verify import parse, verify
print("ready", flush=True)
for line in sys.stdin:
    try:
        answer, reference = json.loads(line)
        gold = parse("\\boxed{" + reference + "}")
        pred = parse("\\boxed{" + answer + "}")
        verdict = "1" if gold and pred and verify(gold, pred) else "0"
    except BaseException:
        verdict = "E"
    print(verdict, flush=True)
"""
WORKER_MEMORY_BYTES = 2 * 1024**3


class _Worker:
    def __init__(self, memory_bytes: int):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_SOURCE, str(memory_bytes)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )

    def read_line(self, timeout_s: float | None) -> str | None:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        return self.proc.stdout.readline().strip() if ready else None

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


class MathVerifyPool:
    """`size` math-verify worker processes. `equivalent(...)` is True / False, or None when no verdict came
    in time (workers still starting or all busy, time limit passed, worker died, math-verify raised)."""

    def __init__(self, size: int = 2, memory_bytes: int = WORKER_MEMORY_BYTES, startup_timeout_s: float = 120.0):
        self.size, self.memory_bytes, self.startup_timeout_s = size, memory_bytes, startup_timeout_s
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: set[_Worker] = set()
        self._lock = threading.Lock()
        self.killed = 0  # workers killed for running past their time limit
        for _ in range(size):
            self._spawn()

    def _spawn(self) -> None:
        def start():
            worker = _Worker(self.memory_bytes)
            with self._lock:
                self._all.add(worker)
            if worker.read_line(self.startup_timeout_s) == "ready":
                self._idle.put(worker)
            else:  # math-verify missing or broken: this slot stays empty, answers keep the safe verdict
                self._retire(worker)

        threading.Thread(target=start, name="math-verify-start", daemon=True).start()

    def wait_ready(self, timeout_s: float) -> bool:
        """Blocks until every worker has started (or `timeout_s` passed); whether they all did."""
        deadline = time.monotonic() + timeout_s
        while self._idle.qsize() < self.size and time.monotonic() < deadline:
            time.sleep(0.05)
        return self._idle.qsize() >= self.size

    def _retire(self, worker: _Worker) -> None:
        worker.kill()
        with self._lock:
            self._all.discard(worker)

    def equivalent(self, answer: str, reference: str, timeout_s: float) -> bool | None:
        try:
            worker = self._idle.get(timeout=timeout_s / 4)
        except queue.Empty:
            return None
        try:
            worker.proc.stdin.write(json.dumps([answer, reference]) + "\n")
            worker.proc.stdin.flush()
            verdict = worker.read_line(timeout_s)
        except (OSError, ValueError):
            verdict = None
        if verdict in ("0", "1", "E"):
            self._idle.put(worker)
            return {"1": True, "0": False}.get(verdict)
        self.killed += 1
        self._retire(worker)
        self._spawn()
        return None

    def close(self) -> None:
        with self._lock:
            workers = list(self._all)
        for worker in workers:
            self._retire(worker)


_POOL: MathVerifyPool | None = None
_POOL_LOCK = threading.Lock()


def math_verify_pool() -> MathVerifyPool:
    """The process-wide pool, started on first use (MTGRPO_MATH_VERIFY_WORKERS workers, default: up to 4, one
    per CPU core)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            default = min(4, os.cpu_count() or 1)
            _POOL = MathVerifyPool(size=max(1, int(os.environ.get("MTGRPO_MATH_VERIFY_WORKERS", default))))
            atexit.register(_POOL.close)
        return _POOL


_VERDICTS: dict[tuple[str, str], bool] = {}  # math-verify's settled verdicts (a group repeats its answers)
_MAX_VERDICTS = 65536


def answers_equivalent(answer: str, reference: str, *, use_math_verify: bool = True, timeout_s: float = 1.0) -> bool:
    """The safe reader; where it says no, math-verify (time-limited, in a worker process) may say yes."""
    if safe_equivalent(answer, reference):
        return True
    if not use_math_verify or not isinstance(answer, str) or not isinstance(reference, str):
        return False
    a, b = normalize_answer(answer), normalize_answer(reference)
    if a is None or b is None:  # too long to read
        return False
    if numeric_value(a) is not None and numeric_value(b) is not None:  # two plain numbers: the safe reader is exact
        return False
    key = (answer, reference)
    if key in _VERDICTS:
        return _VERDICTS[key]
    verdict = math_verify_pool().equivalent(answer, reference, timeout_s)
    if verdict is not None:  # no verdict (busy, slow, starting) is not remembered: a later call may get one
        if len(_VERDICTS) >= _MAX_VERDICTS:
            _VERDICTS.clear()
        _VERDICTS[key] = verdict
    return bool(verdict)


@dataclasses.dataclass
class MathTask(BaseTask):
    """MATH-style problems with a boxed final answer (the released math parquet layout)."""

    # Tier 2 of the answer check (see the module docstring); its time limit stays under the scorer's
    # per-item limit (train.score_timeout_s, default 2 s) so a slow answer costs its reward, not the step's.
    use_math_verify: bool = True
    math_verify_timeout_s: float = 1.0

    family: ClassVar[str] = "math"

    def prompt_body(self, example: Mapping[str, Any]) -> str:
        return f"{example['question']} Put your final answer within \\boxed{{}}. "

    def check(self, answer: str, example: Mapping[str, Any]) -> bool:
        return answers_equivalent(
            answer, target_string(example), use_math_verify=self.use_math_verify, timeout_s=self.math_verify_timeout_s
        )

    def reference_answer(self, example: Mapping[str, Any]) -> str:
        return target_string(example).strip()
