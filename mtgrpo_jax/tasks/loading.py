"""Reading verl-layout parquet files (the released sets' layout) into plain example dicts.

Row layout: `data_source` (e.g. "countdown-easy-test"), `prompt` (chat messages), `ability`,
`reward_model.ground_truth` (countdown: {"numbers": "8,73,96", "target": 841}; zebra/arc/arithmetic:
{"target": "..."}; math: a string) and `extra_info` (`difficulty`, `index`, `question` or
`problem`, `split`, `type`).

Example dict: `task` (a registered task name), `difficulty`, `question` (the bare question),
`answer` (countdown: {"numbers": list[int], "target": int}; otherwise the target string), `prompt`
(the original messages), `data_source`, `split`, `index`.
"""

from __future__ import annotations

import glob
import os
from typing import Any, Iterable, Sequence

from mtgrpo_jax.tasks.registry import canonical_task_name


def _parquet_files(path: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    if isinstance(path, (list, tuple)):
        files: list[str] = []
        for p in path:
            files.extend(_parquet_files(p))
        return files
    path = os.fspath(path)
    if os.path.isdir(path):
        # glob skips hidden folders, so a generation cache (DIR/.cache) is not read twice.
        files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
        if not files:
            raise FileNotFoundError(f"no .parquet files under {path!r}")
        return files
    if any(ch in path for ch in "*?["):
        files = sorted(glob.glob(path))
        if not files:
            raise FileNotFoundError(f"no files match {path!r}")
        return files
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such parquet file: {path!r}")
    return [path]


def _task_of(row: dict[str, Any], forced: str | None) -> str:
    """Task name from (in order) the caller, extra_info.type, data_source words, ability."""
    if forced is not None:
        name = canonical_task_name(forced)
        if name is None:
            raise ValueError(f"load_examples: unknown task {forced!r}")
        return name
    extra = row.get("extra_info") or {}
    candidates = [extra.get("type")]
    source = str(row.get("data_source") or "")
    candidates += [source.split("-")[0]] + source.replace("-", "_").split("_")
    candidates.append(row.get("ability"))
    for candidate in candidates:
        if isinstance(candidate, str) and candidate:
            name = canonical_task_name(candidate)
            if name is not None:
                return name
    raise ValueError(
        f"cannot tell the task of row {extra.get('index')!r} (data_source={source!r}, "
        f"type={extra.get('type')!r}); pass task=..."
    )


def _difficulty(value: Any) -> int | float | None:
    if value is None:
        return None
    value = float(value)
    return int(value) if value.is_integer() else value


def _answer(task: str, ground_truth: Any) -> Any:
    if task == "countdown":
        numbers = ground_truth["numbers"]
        if isinstance(numbers, str):
            numbers = [int(x) for x in numbers.split(",") if x.strip()]
        return {"numbers": [int(x) for x in numbers], "target": int(ground_truth["target"])}
    if isinstance(ground_truth, dict):
        if "target" not in ground_truth:
            raise ValueError(f"ground truth {ground_truth!r} has no 'target'")
        return str(ground_truth["target"])
    return str(ground_truth)


def row_to_example(row: dict[str, Any], task: str | None = None) -> dict[str, Any]:
    """One verl-layout row -> example dict."""
    name = _task_of(row, task)
    extra = dict(row.get("extra_info") or {})
    question = extra.get("question") or extra.get("problem")
    if question is None:
        raise ValueError(f"row {extra.get('index')!r} of {row.get('data_source')!r} has no extra_info.question")
    ground_truth = (row.get("reward_model") or {}).get("ground_truth")
    if ground_truth is None:
        raise ValueError(f"row {extra.get('index')!r} of {row.get('data_source')!r} has no reward_model.ground_truth")
    prompt = [dict(message) for message in (row.get("prompt") or [])]
    return {
        "task": name,
        "difficulty": _difficulty(extra.get("difficulty")),
        "question": question,
        "answer": _answer(name, ground_truth),
        "prompt": prompt,
        "data_source": row.get("data_source"),
        "split": extra.get("split"),
        "index": extra.get("index"),
    }


def load_examples(
    parquet_path: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    task: str | None = None,
    difficulty: int | Iterable[int] | None = None,
) -> list[dict[str, Any]]:
    """Examples from verl-layout parquet file(s) (a file, a directory, a glob, or a list of them),
    read through `datasets`. `task` forces the task name; `difficulty` keeps only those levels."""
    import datasets  # heavy import, only when reading files

    levels = None
    if difficulty is not None:
        levels = {int(difficulty)} if isinstance(difficulty, (int, float)) else {int(d) for d in difficulty}
    examples: list[dict[str, Any]] = []
    for file in _parquet_files(parquet_path):
        # One Dataset per file: the sets' ground-truth structs differ (countdown vs zebra).
        dataset = datasets.Dataset.from_parquet(file, keep_in_memory=True)
        missing = {"prompt", "reward_model", "extra_info"} - set(dataset.column_names)
        if missing:
            raise ValueError(f"{file}: not a verl-layout parquet file (missing columns {sorted(missing)})")
        for row in dataset.to_list():
            example = row_to_example(row, task)
            if levels is None or example["difficulty"] in levels:
                examples.append(example)
    return examples
