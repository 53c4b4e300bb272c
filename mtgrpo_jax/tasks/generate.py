"""Training data for the paper's three families, generated with reasoning-gym at the released sets'
settings (and for the built-in `arithmetic` family, in pure Python), deterministic by seed, in
parallel, cached on disk as verl-layout parquet.

Levels (the released test sets, checked in tests): countdown with 3/4/5 numbers (6 for the held-out
level 4), values 1..100, targets 1..1000; zebra puzzles 3x3/4x4/5x5 (6x6); arc_1d grids of length
10/20/30 (40) with 3 worked examples; arithmetic digit + digit / two-digit +- digit / digit * digit
(digit * digit + two-digit). Question text is rewritten to the released wording (the released sets
ask for a `\\boxed{}` answer; reasoning-gym's own text does not).

Item `i` of (task, level, seed) is reasoning-gym's item `i` of a dataset whose seed is a hash of
(seed, task, level) (arithmetic: drawn from a `random.Random` seeded by that hash and `i`), so any
slice can be generated independently: work is split into chunks, run in worker processes, and each
finished chunk is kept under `OUT/.cache/`, so an interrupted or enlarged run only generates what is
missing. The output is `OUT/<task>/<split>_level<L>.parquet`.

    mtgrpo data generate --tasks countdown,zebra,arc_1d --levels 1,2,3 --per-level 10000 --out data/train
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import importlib.metadata
import json
import multiprocessing
import os
import random
import re
import sys
from typing import Any, Callable, Iterable, Iterator, Sequence

from mtgrpo_jax.tasks import arithmetic

FORMAT_VERSION = 1
LEVEL_NAMES = {1: "easy", 2: "medium", 3: "hard", 4: "very_hard"}

# task -> (reasoning-gym dataset, released `type` / data_source prefix, level -> config)
GENERATORS: dict[str, tuple[str, str, dict[int, dict[str, Any]]]] = {
    "countdown": (
        "countdown",
        "countdown",
        {
            level: dict(min_numbers=k, max_numbers=k, min_value=1, max_value=100, min_target=1, max_target=1000)
            for level, k in {1: 3, 2: 4, 3: 5, 4: 6}.items()
        },
    ),
    "zebra": (
        "zebra_puzzles",
        "zebra",
        {level: dict(num_people=k, num_characteristics=k) for level, k in {1: 3, 2: 4, 3: 5, 4: 6}.items()},
    ),
    "arc_1d": (
        "arc_1d",
        "arc",
        {level: dict(min_size=k, max_size=k, num_train=3) for level, k in {1: 10, 2: 20, 3: 30, 4: 40}.items()},
    ),
}

# task -> (released `type` / data_source prefix, level -> config, item function, generator version) for
# families generated in pure Python: the item function maps (level, rng) to (question, answer string).
ItemFunction = Callable[[int, random.Random], tuple[str, str]]
PYTHON_GENERATORS: dict[str, tuple[str, dict[int, dict[str, Any]], ItemFunction, int]] = {
    "arithmetic": ("arithmetic", arithmetic.LEVELS, arithmetic.arithmetic_item, arithmetic.GENERATOR_VERSION),
}

_ZEBRA_SUFFIX = " Provide only the name of the person as your final answer."
_ZEBRA_RELEASED_SUFFIX = (
    "? Provide only the name of the person as your final answer and put in in \\boxed{}, for example: \\boxed{Alice}."
)
_ARC_INSTRUCTION = "Your final answer should be just the test output grid itself."
_ARC_RELEASED_INSTRUCTION = (
    "Your final answer must be placed in \\boxed{} and should be just the test output grid itself."
)


def _canonical(task: str) -> str:
    from mtgrpo_jax.tasks.registry import canonical_task_name

    name = canonical_task_name(task)
    if name not in GENERATORS and name not in PYTHON_GENERATORS:
        raise ValueError(f"cannot generate task {task!r}; generatable: {sorted([*GENERATORS, *PYTHON_GENERATORS])}")
    return name


def _level_configs(task: str) -> dict[int, dict[str, Any]]:
    return PYTHON_GENERATORS[task][1] if task in PYTHON_GENERATORS else GENERATORS[task][2]


def _check_level(task: str, level: int) -> None:
    if level not in _level_configs(task):
        raise ValueError(f"{task}: level must be one of {sorted(_level_configs(task))}, got {level!r}")


def dataset_seed(seed: int, task: str, level: int) -> int:
    """reasoning-gym's base seed for (seed, task, level): hashed so different seeds do not overlap."""
    digest = hashlib.sha256(f"mtgrpo:{int(seed)}:{task}:{int(level)}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _released_question(task: str, item: dict[str, Any]) -> str:
    if task == "countdown":
        numbers = ", ".join(str(x) for x in item["metadata"]["numbers"])
        return (
            f"Using the numbers {numbers} and basic arithmetic operations (+, -, *, /), create an expression "
            f"that equals {item['metadata']['target']}.\nYou need to use each number exactly once.\n"
            "Present the final expression that equals the target number within \\boxed{}. "
            "For example: \\boxed{46+68/(52-50)}\n"
        )
    question = item["question"]
    if task == "zebra":
        if not question.endswith(_ZEBRA_SUFFIX):
            raise RuntimeError("reasoning-gym zebra question changed format; update _released_question")
        return question[: -len(_ZEBRA_SUFFIX)].rstrip("?") + _ZEBRA_RELEASED_SUFFIX
    if _ARC_INSTRUCTION not in question:
        raise RuntimeError("reasoning-gym arc_1d question changed format; update _released_question")
    return question.replace(_ARC_INSTRUCTION, _ARC_RELEASED_INSTRUCTION)


def _ground_truth(task: str, item: dict[str, Any]) -> dict[str, Any]:
    if task == "countdown":
        meta = item["metadata"]
        return {"numbers": ",".join(str(int(x)) for x in meta["numbers"]), "target": int(meta["target"])}
    return {"target": str(item["answer"]).strip()}


def _rg_item(rg_name: str, config: dict[str, Any], base_seed: int, dataset: Any, index: int) -> dict[str, Any]:
    """reasoning-gym's item `index`; its countdown generator gives up (ValueError) on rare seeds,
    and then the item comes from a deterministic re-seeded copy."""
    import reasoning_gym

    for attempt in range(8):
        if attempt:
            reseeded = (base_seed + 0x9E3779B1 * attempt) % 2**32
            dataset = reasoning_gym.create_dataset(rg_name, seed=reseeded, size=index + 1, **config)
        try:
            return dataset[index]
        except ValueError:
            continue
    raise RuntimeError(f"reasoning-gym {rg_name} failed to generate item {index} (seed {base_seed})")


def _rg_items(task: str, level: int, start: int, stop: int, base_seed: int) -> Iterator[tuple[int, str, dict]]:
    """(index, released question, ground truth) of reasoning-gym items [start, stop)."""
    import reasoning_gym

    rg_name, _, configs = GENERATORS[task]
    dataset = reasoning_gym.create_dataset(rg_name, seed=base_seed, size=max(stop, 1), **configs[level])
    for index in range(start, stop):
        item = _rg_item(rg_name, configs[level], base_seed, dataset, index)
        yield index, _released_question(task, item), _ground_truth(task, item)


def _python_items(task: str, level: int, start: int, stop: int, base_seed: int) -> Iterator[tuple[int, str, dict]]:
    """(index, question, ground truth) of pure-Python items [start, stop): item `index` has its own
    generator, seeded by (index, base_seed) without collisions, so slices are independent."""
    make_item = PYTHON_GENERATORS[task][2]
    for index in range(start, stop):
        question, answer = make_item(level, random.Random(index * 2**32 + base_seed))
        yield index, question, {"target": answer}


def generate_rows(task: str, level: int, start: int, stop: int, seed: int = 0, split: str = "train") -> list[dict]:
    """verl-layout rows for items [start, stop) of (task, level, seed)."""
    from mtgrpo_jax.tasks.loading import row_to_example
    from mtgrpo_jax.tasks.registry import get_task

    task = _canonical(task)
    _check_level(task, level)
    base_seed = dataset_seed(seed, task, level)
    if task in PYTHON_GENERATORS:
        released_type, items = PYTHON_GENERATORS[task][0], _python_items(task, level, start, stop, base_seed)
    else:
        released_type, items = GENERATORS[task][1], _rg_items(task, level, start, stop, base_seed)
    prompter = get_task(task)  # the released prompt text
    rows = []
    for index, question, ground_truth in items:
        row = {
            "data_source": f"{released_type}-{LEVEL_NAMES[level]}-{split}",
            "prompt": [],
            "ability": "math",
            "reward_model": {"ground_truth": ground_truth, "style": "rule"},
            "extra_info": {
                "difficulty": int(level),
                "index": int(index),
                "question": question,
                "split": split,
                "type": released_type,
            },
        }
        row["prompt"] = prompter.prompt(row_to_example(row, task))
        rows.append(row)
    return rows


def generate_examples(task: str, level: int, n: int, seed: int = 0, *, start: int = 0, split: str = "train") -> list[dict]:
    """`n` example dicts (the `load_examples` layout) of one task and level, generated in-process."""
    from mtgrpo_jax.tasks.loading import row_to_example

    if n < 0 or start < 0:
        raise ValueError(f"generate_examples: n and start must be >= 0, got n={n}, start={start}")
    return [row_to_example(row) for row in generate_rows(task, level, start, start + n, seed, split)]


# --- cached, parallel generation -------------------------------------------------------------------
def _arrow_schema(task: str):
    import pyarrow as pa

    if task == "countdown":
        ground_truth = pa.struct([("numbers", pa.string()), ("target", pa.int64())])
    else:
        ground_truth = pa.struct([("target", pa.string())])
    return pa.schema(
        [
            ("data_source", pa.string()),
            ("prompt", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))),
            ("ability", pa.string()),
            ("reward_model", pa.struct([("ground_truth", ground_truth), ("style", pa.string())])),
            (
                "extra_info",
                pa.struct(
                    [
                        ("difficulty", pa.int64()),
                        ("index", pa.int64()),
                        ("question", pa.string()),
                        ("split", pa.string()),
                        ("type", pa.string()),
                    ]
                ),
            ),
        ]
    )


def _write_parquet(path: str, task: str, rows: list[dict], fingerprint: str | None = None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _arrow_schema(task)
    if fingerprint is not None:
        schema = schema.with_metadata({"mtgrpo_fingerprint": fingerprint})
    table = pa.Table.from_pylist(rows, schema=schema)
    tmp = f"{path}.tmp{os.getpid()}"
    pq.write_table(table, tmp)
    os.replace(tmp, path)  # a chunk is either complete or absent


def _read_rows(path: str) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def fingerprint(task: str, level: int, seed: int, split: str) -> str:
    """Identifies everything that determines the items, so a cache is never reused across settings."""
    spec = {
        "task": task,
        "level": level,
        "seed": int(seed),
        "split": split,
        "config": _level_configs(task)[level],
        "format": FORMAT_VERSION,
    }
    if task in PYTHON_GENERATORS:
        spec["generator"] = PYTHON_GENERATORS[task][3]
    else:
        spec["reasoning_gym"] = importlib.metadata.version("reasoning-gym")
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


_CHUNK_RE = re.compile(r"^items-(\d+)-(\d+)\.parquet$")


def _cached_ranges(cache_dir: str) -> list[tuple[int, int, str]]:
    if not os.path.isdir(cache_dir):
        return []
    out = []
    for name in os.listdir(cache_dir):
        match = _CHUNK_RE.match(name)
        if match:
            out.append((int(match.group(1)), int(match.group(2)), os.path.join(cache_dir, name)))
    return sorted(out)


def _missing_chunks(n: int, covered: Iterable[tuple[int, int, str]], chunk_size: int) -> list[tuple[int, int]]:
    have = [False] * n
    for start, stop, _ in covered:
        for i in range(max(0, start), min(n, stop)):
            have[i] = True
    chunks, i = [], 0
    while i < n:
        if have[i]:
            i += 1
            continue
        j = i
        while j < n and not have[j] and j - i < chunk_size:
            j += 1
        chunks.append((i, j))
        i = j
    return chunks


def _work(args: tuple[str, int, int, int, int, str]) -> tuple[tuple[str, int, int, int], list[dict]]:
    task, level, start, stop, seed, split = args
    return (task, level, start, stop), generate_rows(task, level, start, stop, seed, split)


def generate_dataset(
    tasks: Sequence[str],
    levels: Sequence[int],
    per_level: int,
    out_dir: str,
    *,
    seed: int = 0,
    workers: int = 1,
    split: str = "train",
    chunk_size: int = 32,
    progress: bool = True,
) -> dict[tuple[str, int], str]:
    """Generate (or complete from the cache) `per_level` items for every task and level; returns
    {(task, level): parquet path}."""
    from tqdm.auto import tqdm

    if per_level <= 0:
        raise ValueError(f"per_level must be positive, got {per_level}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    tasks = [_canonical(t) for t in tasks]
    for task in tasks:
        for level in levels:
            _check_level(task, level)
    jobs: list[tuple[str, int, int, int, int, str]] = []
    plan: dict[tuple[str, int], tuple[str, str, str]] = {}
    for task in tasks:
        for level in levels:
            fp = fingerprint(task, level, seed, split)
            cache_dir = os.path.join(out_dir, ".cache", f"{task}-level{level}-seed{seed}-{split}-{fp}")
            final = os.path.join(out_dir, task, f"{split}_level{level}.parquet")
            plan[(task, level)] = (cache_dir, final, fp)
            if _final_is_current(final, fp, per_level):
                continue
            os.makedirs(cache_dir, exist_ok=True)
            for start, stop in _missing_chunks(per_level, _cached_ranges(cache_dir), chunk_size):
                jobs.append((task, level, start, stop, seed, split))

    total = sum(stop - start for _, _, start, stop, _, _ in jobs)
    bar = tqdm(total=total, desc="generate", unit="item", disable=not progress or total == 0)

    def save(key: tuple[str, int, int, int], rows: list[dict]) -> None:
        task, level, start, stop = key
        _write_parquet(os.path.join(plan[(task, level)][0], f"items-{start:08d}-{stop:08d}.parquet"), task, rows)
        bar.update(stop - start)

    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                save(*_work(job))
        else:
            # spawn, not fork: the caller may be a process with JAX (and its threads) already running.
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
                for future in concurrent.futures.as_completed([pool.submit(_work, job) for job in jobs]):
                    save(*future.result())
    finally:
        bar.close()

    outputs = {}
    for (task, level), (cache_dir, final, fp) in plan.items():
        outputs[(task, level)] = final
        if _final_is_current(final, fp, per_level):
            continue
        rows_by_index: dict[int, dict] = {}
        for start, stop, path in _cached_ranges(cache_dir):
            if start >= per_level:
                continue
            for row in _read_rows(path):
                rows_by_index.setdefault(row["extra_info"]["index"], row)
        rows = [rows_by_index[i] for i in range(per_level)]
        os.makedirs(os.path.dirname(final), exist_ok=True)
        _write_parquet(final, task, rows, fingerprint=f"{fp}:{per_level}")
    return outputs


def _final_is_current(path: str, fp: str, n: int) -> bool:
    if not os.path.exists(path):
        return False
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_schema(path).metadata or {}
    except Exception:
        return False
    return metadata.get(b"mtgrpo_fingerprint") == f"{fp}:{n}".encode()


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def main(argv: list[str] | None = None, prog: str = "mtgrpo data generate") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="countdown,zebra,arc_1d",
                        help="comma-separated: countdown,zebra,arc_1d,arithmetic")
    parser.add_argument("--levels", type=_int_list, default=[1, 2, 3], help="comma-separated levels 1-4 (4 = held-out)")
    parser.add_argument("--per-level", type=int, required=True, help="items per task and level")
    parser.add_argument("--out", required=True, help="output directory (cache under OUT/.cache)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="worker processes")
    parser.add_argument("--split", default="train", help="split name written into the rows")
    parser.add_argument("--chunk-size", type=int, default=32, help="items per cached chunk")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        outputs = generate_dataset(
            tasks,
            args.levels,
            args.per_level,
            args.out,
            seed=args.seed,
            workers=args.workers,
            split=args.split,
            chunk_size=args.chunk_size,
            progress=not args.no_progress,
        )
    except ValueError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    for (task, level), path in sorted(outputs.items()):
        print(f"{task} level {level}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
