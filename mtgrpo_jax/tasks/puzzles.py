"""Zebra puzzles and ARC-1D: string answers matched the way the released verifiers do (surrounding
whitespace trimmed, case-insensitive)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

from mtgrpo_jax.tasks.base import BaseTask, target_string


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
class ZebraTask(ExactMatchTask):
    """Logic grid puzzles (reasoning-gym `zebra_puzzles`); the answer is a name."""

    family: ClassVar[str] = "zebra"

    def demonstration_reasoning(self, example: Mapping[str, Any]) -> str:
        return (
            "I go through the clues one at a time, place every attribute they fix, and eliminate the "
            "options that contradict a clue until each house is determined. Then I read off the asked house."
        )


@dataclasses.dataclass
class Arc1DTask(ExactMatchTask):
    """One-dimensional ARC (reasoning-gym `arc_1d`); the answer is the output grid as a string."""

    family: ClassVar[str] = "arc_1d"

    def demonstration_reasoning(self, example: Mapping[str, Any]) -> str:
        return (
            "I compare each example input with its output to find the transformation they share, "
            "check that it explains every example, and apply it cell by cell to the test input."
        )
