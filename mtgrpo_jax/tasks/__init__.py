"""Reasoning tasks: prompts, safe verifiers, data generation (reasoning-gym; built-in arithmetic) and
verl-layout parquet reading.

    from mtgrpo_jax.tasks import get_task, load_examples
    examples = load_examples("test_countdown.parquet")
    task = get_task(examples[0]["task"])
    task.prompt(examples[0])                 # the released chat messages
    task.score(completion, examples[0])      # Score(reward=1.0 | 0.1 | 0, correct, formatted)

This package never imports models, rollout or training code.
"""

from mtgrpo_jax.tasks.base import (
    PROMPT_PREFIX,
    PROMPT_STYLES,
    PROMPT_SUFFIX,
    BaseTask,
    Score,
    Task,
    extract_boxed,
)
from mtgrpo_jax.tasks.arithmetic import ArithmeticTask, arithmetic_item, parse_integer_answer
from mtgrpo_jax.tasks.countdown import CountdownTask, evaluate_expression, solve_countdown
from mtgrpo_jax.tasks.generate import generate_dataset, generate_examples
from mtgrpo_jax.tasks.loading import load_examples, row_to_example
from mtgrpo_jax.tasks.math_answer import MathTask, answers_equivalent, normalize_answer
from mtgrpo_jax.tasks.puzzles import Arc1DTask, ZebraTask
from mtgrpo_jax.tasks.registry import (
    ENTRY_POINT_GROUP,
    canonical_task_name,
    get_task,
    list_tasks,
    register_task,
    resolve_task,
)
from mtgrpo_jax.tasks.scoring import ScoreStats, score_batch

__all__ = [
    "ENTRY_POINT_GROUP",
    "PROMPT_PREFIX",
    "PROMPT_STYLES",
    "PROMPT_SUFFIX",
    "Arc1DTask",
    "ArithmeticTask",
    "BaseTask",
    "CountdownTask",
    "MathTask",
    "Score",
    "ScoreStats",
    "Task",
    "ZebraTask",
    "answers_equivalent",
    "arithmetic_item",
    "canonical_task_name",
    "evaluate_expression",
    "extract_boxed",
    "generate_dataset",
    "generate_examples",
    "get_task",
    "list_tasks",
    "load_examples",
    "normalize_answer",
    "parse_integer_answer",
    "register_task",
    "resolve_task",
    "row_to_example",
    "score_batch",
    "solve_countdown",
]
