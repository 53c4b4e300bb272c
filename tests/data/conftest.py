"""Fixtures for the data tests: where the paper's released test sets live (bundled under data/mtgrpo_paper)."""

from __future__ import annotations

import os

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
_CANDIDATES = [
    os.environ.get("MTGRPO_RELEASED_DIR", ""),
    os.path.join(_HERE, "..", "..", "data", "mtgrpo_paper"),  # bundled in the repository
]


@pytest.fixture(scope="session")
def released_dir() -> str:
    found = next((os.path.abspath(p) for p in _CANDIDATES if p and os.path.isdir(p)), None)
    if found is None:
        raise FileNotFoundError("released test sets not found under data/mtgrpo_paper")
    return found
