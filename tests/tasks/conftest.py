"""Fixtures for the task tests: the paper's released test sets (bundled under data/mtgrpo_paper)."""

from __future__ import annotations

import os

import pytest

from mtgrpo_jax.tasks import load_examples

_HERE = os.path.dirname(os.path.abspath(__file__))
_CANDIDATES = [
    os.environ.get("MTGRPO_RELEASED_DIR", ""),
    os.path.join(_HERE, "..", "..", "data", "mtgrpo_paper"),  # bundled in the repository
]
RELEASED_DIR = next((os.path.abspath(p) for p in _CANDIDATES if p and os.path.isdir(p)), None)
RELEASED_FILES = {"countdown": "test_countdown.parquet", "zebra": "test_zebra.parquet", "arc_1d": "test_arc.parquet"}


@pytest.fixture(scope="session")
def released_dir() -> str:
    if RELEASED_DIR is None:
        raise FileNotFoundError("released test sets not found under data/mtgrpo_paper")
    return RELEASED_DIR


@pytest.fixture(scope="session")
def released(released_dir) -> dict[str, list[dict]]:
    """task name -> the 800 examples of its released test set."""
    return {task: load_examples(os.path.join(released_dir, name)) for task, name in RELEASED_FILES.items()}
