"""The Task protocol, the shared prompt template and the boxed-answer reading every built-in uses.

A task turns an example (a plain dict, see `load_examples`) into chat messages and scores a model's
completion for it. Scoring follows the paper's protocol: 1.0 for a correct final answer, 0.1 for a
wrong answer that is formatted (a `\\boxed{...}` is present), 0 otherwise.

Model output is untrusted, so everything here reads it with bounded work: the box search looks at a
fixed number of candidates and a fixed number of characters, whatever the completion's length.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable

# The R1-Zero style frame of the released sets: `PROMPT_PREFIX + body + PROMPT_SUFFIX`, one user message.
PROMPT_PREFIX = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer.\nUser: "
)
PROMPT_SUFFIX = "\nAssistant: Let me solve this step by step."

PROMPT_STYLES = ("released", "question", "compact")
DEMONSTRATION_STYLES = ("reasoning", "answer")
COMPACT_BOX_INSTRUCTION = "Put the final answer in \\boxed{}."

# Bounds that make reading a completion cost microseconds whatever its size.
MAX_BOX_CONTENT_CHARS = 2048  # a box whose closing brace lies further than this is not read
MAX_BOX_CANDIDATES = 16  # how many `\boxed{` occurrences (from the end) the default mode tries

_BOX_MARKER = "\\boxed"
_BRACE_RE = re.compile(r"[{}]")


class Score(NamedTuple):
    """One completion's score. `reward` is what RL uses; `correct` is what accuracy counts."""

    reward: float
    correct: bool
    formatted: bool


ZERO_SCORE = Score(0.0, False, False)


@runtime_checkable
class Task(Protocol):
    """What the trainer and the evaluator need from a task. `difficulty` is None for a task that
    accepts every level of its family.

    Optional: `demonstration(example) -> str`, a correct completion in the prompt's answer format,
    for the supervised warm start (every built-in has one).
    """

    name: str
    family: str
    difficulty: int | None

    def prompt(self, example: Mapping[str, Any]) -> list[dict[str, str]]: ...

    def score(self, completion: str, example: Mapping[str, Any]) -> Score: ...


def _box_at(text: str, start: int) -> str | None:
    """Content of the `\\boxed{...}` starting at `start` (nested braces balanced), or None when the
    marker is not directly followed by `{` or the box does not close within the content bound."""
    open_at = start + len(_BOX_MARKER)
    if text[open_at : open_at + 1] != "{":
        return None
    depth = 0
    for match in _BRACE_RE.finditer(text, open_at, open_at + 2 + MAX_BOX_CONTENT_CHARS):
        if match.group() == "{":
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : match.start()]
    return None


def extract_boxed(text: str, *, last_line_only: bool = False) -> str | None:
    """The final boxed answer of a completion, or None.

    Default: the last complete `\\boxed{...}` anywhere (a truncated last box falls back to the one
    before it). `last_line_only=True` reproduces the released verifier: only the completion's last
    line is read and only its last `\\boxed` counts.
    """
    if not isinstance(text, str):
        return None
    if last_line_only:
        text = text[text.rfind("\n") + 1 :]
        idx = text.rfind(_BOX_MARKER)
        return None if idx < 0 else _box_at(text, idx)
    end = len(text)
    for _ in range(MAX_BOX_CANDIDATES):
        idx = text.rfind(_BOX_MARKER, 0, end)
        if idx < 0:
            return None
        content = _box_at(text, idx)
        if content is not None:
            return content
        end = idx
    return None


def r1_prompt(body: str) -> list[dict[str, str]]:
    """The released sets' single user message around a prompt body."""
    return [{"role": "user", "content": PROMPT_PREFIX + body + PROMPT_SUFFIX}]


def compact_prompt(body: str) -> list[dict[str, str]]:
    """A short prompt for tiny models: the question and, unless it already asks for one, a box."""
    body = body.rstrip()
    if "\\boxed" not in body:
        body = f"{body}\n{COMPACT_BOX_INSTRUCTION}"
    return [{"role": "user", "content": body}]


def demonstration_text(reasoning: str, answer: str, style: str = "reasoning") -> str:
    """A completion in the format the prompts ask for: reasoning in <think> tags, then the boxed
    answer alone on the last line (so the released last-line reader finds it too). style="answer"
    gives the boxed answer alone, short enough for a tiny model's few generated tokens."""
    if style == "answer":
        return f"\\boxed{{{answer}}}"
    return f"<think>\n{reasoning.strip()}\n</think>\nThe final answer is \\boxed{{{answer}}}."


@dataclasses.dataclass
class BaseTask:
    """Shared machinery for built-in tasks: options, prompt styles and the exception-safe scorer.

    Subclasses set `family`, implement `prompt_body`, `check` and `reference_answer`, and may
    override `compact_body` and `demonstration`. A family that can make its own data also sets
    `levels` and implements `generate_items` (see `ReasoningGymTask` for one backed by reasoning-gym);
    one whose stored answers are not plain strings overrides `parse_answer` and `answer_arrow_type`.

    Options:
      difficulty: bind the task to one level (its name becomes `family-difficulty`); None = any.
      prompt_style: "released" reproduces the released prompt text exactly (a base model's transcript);
        "question" is the same question and instruction without the transcript (an instruct model's user
        turn); "compact" is the bare question plus a box instruction, for tiny models.
      box_last_line_only: read the box on the completion's last line only (released-code parity).
      correct_reward / format_reward: the paper's 1.0 / 0.1.
      demonstration_style: "reasoning" (a <think> trace, then the boxed answer) or "answer" (the
        boxed answer alone) for supervised warm-start demonstrations.
    """

    difficulty: int | None = None
    prompt_style: str = "released"
    box_last_line_only: bool = False
    correct_reward: float = 1.0
    format_reward: float = 0.1
    demonstration_style: str = "reasoning"

    family: ClassVar[str] = ""
    # Data: level -> generator settings (empty: the family is read from files only); the released rows'
    # `type` and data_source prefix (default: the family); what else fixes the item stream (cache key).
    levels: ClassVar[Mapping[int, Mapping[str, Any]]] = {}
    source_type: ClassVar[str] = ""
    generator_version: ClassVar[Any] = None

    def __post_init__(self) -> None:
        if self.prompt_style not in PROMPT_STYLES:
            raise ValueError(f"prompt_style must be one of {PROMPT_STYLES}, got {self.prompt_style!r}")
        if self.demonstration_style not in DEMONSTRATION_STYLES:
            raise ValueError(
                f"demonstration_style must be one of {DEMONSTRATION_STYLES}, got {self.demonstration_style!r}"
            )
        if self.difficulty is not None:
            if isinstance(self.difficulty, bool) or int(self.difficulty) != self.difficulty:
                raise ValueError(f"difficulty must be an integer or None, got {self.difficulty!r}")
            self.difficulty = int(self.difficulty)

    @property
    def name(self) -> str:
        return self.family if self.difficulty is None else f"{self.family}-{self.difficulty}"

    def with_options(self, **options: Any) -> BaseTask:
        """A copy with some options changed (unknown names raise)."""
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise ValueError(f"task {self.name!r} has no option(s) {unknown}; options: {sorted(fields)}")
        return dataclasses.replace(self, **options)

    # --- prompts ---------------------------------------------------------------------------------
    def prompt_body(self, example: Mapping[str, Any]) -> str:
        return str(example["question"])

    def compact_body(self, example: Mapping[str, Any]) -> str:
        return str(example["question"])

    def prompt(self, example: Mapping[str, Any]) -> list[dict[str, str]]:
        if self.prompt_style == "compact":
            return compact_prompt(self.compact_body(example))
        if self.prompt_style == "question":  # an instruct model's user turn: no transcript around it
            return [{"role": "user", "content": self.prompt_body(example)}]
        return r1_prompt(self.prompt_body(example))

    # --- scoring ---------------------------------------------------------------------------------
    def check(self, answer: str, example: Mapping[str, Any]) -> bool:
        """Whether a boxed answer is correct. May raise: `score` turns exceptions into 0."""
        raise NotImplementedError

    def verify(self, completion: str, example: Mapping[str, Any]) -> Score:
        """Score without the exception guard (what `score` wraps)."""
        answer = extract_boxed(completion, last_line_only=self.box_last_line_only)
        if answer is None:
            return ZERO_SCORE
        if self.check(answer, example):
            return Score(float(self.correct_reward), True, True)
        return Score(float(self.format_reward), False, True)

    def score_with_status(self, completion: str, example: Mapping[str, Any]) -> tuple[Score, str]:
        """(score, "ok") or (zero score, "error") when the verifier raised."""
        try:
            return self.verify(completion, example), "ok"
        except Exception:  # untrusted input: any failure scores 0 and is counted by the caller
            return ZERO_SCORE, "error"

    def score(self, completion: str, example: Mapping[str, Any]) -> Score:
        return self.score_with_status(completion, example)[0]

    # --- data -------------------------------------------------------------------------------------
    @property
    def generator_fingerprint(self) -> dict[str, Any]:
        """Whatever fixes the generated item stream besides the level settings (part of the cache key)."""
        return {"generator": self.generator_version}

    def generate_items(self, level: int, start: int, stop: int, base_seed: int) -> Iterator[tuple[int, str, Any]]:
        """(index, question, ground truth) of items [start, stop) of `level`; item `index` must not
        depend on which slice is asked for (generation runs in independent chunks)."""
        raise ValueError(f"task family {self.family!r} cannot generate data (it sets no levels)")

    def parse_answer(self, ground_truth: Any) -> Any:
        """The example's `answer` from a stored ground truth: by default the target string of a
        {"target": ...} mapping or the value itself."""
        if isinstance(ground_truth, Mapping):
            if "target" not in ground_truth:
                raise ValueError(f"ground truth {ground_truth!r} has no 'target'")
            return str(ground_truth["target"])
        return str(ground_truth)

    @classmethod
    def answer_arrow_type(cls):
        """The pyarrow type of the generated rows' `reward_model.ground_truth`."""
        import pyarrow as pa

        return pa.struct([("target", pa.string())])

    # --- supervised warm start -------------------------------------------------------------------
    def reference_answer(self, example: Mapping[str, Any]) -> str:
        raise NotImplementedError

    def demonstration_reasoning(self, example: Mapping[str, Any]) -> str:
        return "I work through the problem step by step and check the result against the question."

    def demonstration(self, example: Mapping[str, Any]) -> str:
        """A correct completion for the example, in the format its prompt asks for."""
        return demonstration_text(
            self.demonstration_reasoning(example), self.reference_answer(example), self.demonstration_style
        )


def answer_field(example: Mapping[str, Any]) -> Any:
    """The reference answer of an example, whether it came from `load_examples` (`answer`) or is a
    raw verl row (`reward_model.ground_truth`)."""
    if "answer" in example:
        return example["answer"]
    try:
        return example["reward_model"]["ground_truth"]
    except (KeyError, TypeError):
        raise ValueError("example has neither 'answer' nor 'reward_model.ground_truth'") from None


def target_string(example: Mapping[str, Any]) -> str:
    """String answers (zebra, arc, math): accept a bare string or a {"target": ...} mapping."""
    answer = answer_field(example)
    if isinstance(answer, Mapping):
        answer = answer.get("target")
    if answer is None:
        raise ValueError("example answer has no target")
    return str(answer)
