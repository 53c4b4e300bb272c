"""Zebra puzzles and ARC-1D: string answers matched the way the released verifiers do (surrounding
whitespace trimmed, case-insensitive)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

from mtgrpo_jax.tasks.base import BaseTask, target_string
from mtgrpo_jax.tasks.reasoning_gym import ReasoningGymTask

_ZEBRA_SUFFIX = " Provide only the name of the person as your final answer."
_ZEBRA_RELEASED_SUFFIX = (
    "? Provide only the name of the person as your final answer and put in in \\boxed{}, for example: \\boxed{Alice}."
)
_ARC_INSTRUCTION = "Your final answer should be just the test output grid itself."
_ARC_RELEASED_INSTRUCTION = (
    "Your final answer must be placed in \\boxed{} and should be just the test output grid itself."
)


def exact_match(answer: str, target: str) -> bool:
    return answer.strip().lower() == target.strip().lower()


@dataclasses.dataclass
class ExactMatchTask(BaseTask):
    """A task whose answer is a target string, matched after trimming, case-insensitively (the released
    zebra and ARC verifiers)."""

    def check(self, answer: str, example: Mapping[str, Any]) -> bool:
        return exact_match(answer, target_string(example))

    def reference_answer(self, example: Mapping[str, Any]) -> str:
        return target_string(example).strip()


@dataclasses.dataclass
class ZebraTask(ReasoningGymTask, ExactMatchTask):
    """Logic grid puzzles (reasoning-gym `zebra_puzzles`); the answer is a name. Levels: 3x3 / 4x4 /
    5x5 grids (6x6 held out)."""

    family: ClassVar[str] = "zebra"
    rg_dataset: ClassVar[str] = "zebra_puzzles"
    levels: ClassVar[dict[int, dict[str, Any]]] = {
        level: dict(num_people=k, num_characteristics=k) for level, k in {1: 3, 2: 4, 3: 5, 4: 6}.items()
    }

    def released_question(self, item: dict[str, Any]) -> str:
        question = item["question"]
        if not question.endswith(_ZEBRA_SUFFIX):
            raise RuntimeError("reasoning-gym zebra question changed format; update ZebraTask.released_question")
        return question[: -len(_ZEBRA_SUFFIX)].rstrip("?") + _ZEBRA_RELEASED_SUFFIX

    def demonstration_reasoning(self, example: Mapping[str, Any]) -> str:
        return (
            "I go through the clues one at a time, place every attribute they fix, and eliminate the "
            "options that contradict a clue until each house is determined. Then I read off the asked house."
        )


@dataclasses.dataclass
class Arc1DTask(ReasoningGymTask, ExactMatchTask):
    """One-dimensional ARC (reasoning-gym `arc_1d`); the answer is the output grid as a string. Levels:
    grids of length 10 / 20 / 30 (40 held out), three worked examples each."""

    family: ClassVar[str] = "arc_1d"
    rg_dataset: ClassVar[str] = "arc_1d"
    source_type: ClassVar[str] = "arc"
    levels: ClassVar[dict[int, dict[str, Any]]] = {
        level: dict(min_size=k, max_size=k, num_train=3) for level, k in {1: 10, 2: 20, 3: 30, 4: 40}.items()
    }

    def released_question(self, item: dict[str, Any]) -> str:
        question = item["question"]
        if _ARC_INSTRUCTION not in question:
            raise RuntimeError("reasoning-gym arc_1d question changed format; update Arc1DTask.released_question")
        return question.replace(_ARC_INSTRUCTION, _ARC_RELEASED_INSTRUCTION)

    def demonstration_reasoning(self, example: Mapping[str, Any]) -> str:
        return (
            "I compare each example input with its output to find the transformation they share, "
            "check that it explains every example, and apply it cell by cell to the test input."
        )
