"""The last-line answer reader against the released verifier's own reader, written out below from
github.com/rsshyam/MT-GRPO verl/verl/utils/reward_score/utils.py (line numbers of that file):

  3-16   extract_solution: drop everything before the first "Assistant:" (or "<|im_start|>assistant"),
         keep the last line (`split('\\n')[-1]`, line 13), read the last box on it
  19-26  remove_boxed: the string must start with "\\boxed{" and end with "}" (so an `\\fbox{..}` that
         `last_boxed_only_string` finds is rejected: the file's own __main__ prints None for it, line 58)
  28-51  last_boxed_only_string: rfind("\\boxed"), else rfind("\\fbox"); then brace matching from there

and the config switch that turns it on (`train.box_last_line_only`, on in the paper configs).
"""

from pathlib import Path

import pytest

from mtgrpo_jax.config import load_config
from mtgrpo_jax.tasks import resolve_task
from mtgrpo_jax.tasks.base import PROMPT_SUFFIX, extract_boxed

ROOT = Path(__file__).resolve().parents[2]


def _remove_boxed(s):  # utils.py 19-26
    left = "\\boxed{"
    try:
        assert s[: len(left)] == left
        assert s[-1] == "}"
        return s[len(left) : -1]
    except Exception:
        return None


def _last_boxed_only_string(string):  # utils.py 28-51
    idx = string.rfind("\\boxed")
    if idx < 0:
        idx = string.rfind("\\fbox")
        if idx < 0:
            return None
    i, right, depth = idx, None, 0
    while i < len(string):
        if string[i] == "{":
            depth += 1
        if string[i] == "}":
            depth -= 1
            if depth == 0:
                right = i
                break
        i += 1
    return None if right is None else string[idx : right + 1]


def released_extract_solution(solution_str):  # utils.py 3-16
    if "Assistant:" in solution_str:
        solution_str = solution_str.split("Assistant:", 1)[1]
    elif "<|im_start|>assistant" in solution_str:
        solution_str = solution_str.split("<|im_start|>assistant", 1)[1]
    else:
        return None
    solution_str = solution_str.split("\n")[-1]
    return _remove_boxed(_last_boxed_only_string(solution_str))


COMPLETIONS = [
    "<think>\n2+2\n</think>\nThe final answer is \\boxed{4}.",
    "\\boxed{4}",
    "The answer is \\boxed{4}\n",  # last line empty: nothing read
    "\\boxed{3}\nso the answer is \\boxed{4}",
    "\\boxed{4}\nwait, let me check",  # the box is not on the last line
    "answer: \\boxed{\\frac{1}{2}} and \\boxed{x^{2}}",
    "answer: \\fbox{7}",  # found, then rejected by remove_boxed
    "answer: \\boxed{7} then \\fbox{8}",
    "answer: \\boxed{unclosed",
    "answer: \\boxed 7",
    "answer: \\boxed{a}}} trailing",
    "",
    "no box at all",
    "x\n\\boxed{ 12 }",
]


@pytest.mark.parametrize("completion", COMPLETIONS)
def test_last_line_reader_matches_the_release(completion):
    # the release reads the decoded prompt + response; the prompt ends with the Assistant turn marker
    full = "User: what is 2+2?" + PROMPT_SUFFIX + completion
    assert extract_boxed(completion, last_line_only=True) == released_extract_solution(full)


def test_default_reader_differs_where_the_box_is_not_on_the_last_line():
    assert extract_boxed("\\boxed{4}\nwait, let me check") == "4"
    assert extract_boxed("\\boxed{4}\nwait, let me check", last_line_only=True) is None


def test_paper_configs_turn_the_last_line_reader_on_for_training_tasks():
    from mtgrpo_jax.train.setup import with_task_options

    for exp in ("exp1", "exp2", "exp3"):
        cfg = load_config(ROOT / "configs" / "paper" / f"{exp}.yaml")
        assert cfg.train.box_last_line_only
        task = with_task_options(resolve_task(cfg.tasks[0].family), cfg)
        assert task.box_last_line_only
    demo = load_config(ROOT / "configs" / "demo.yaml")
    assert not demo.train.box_last_line_only
    assert not with_task_options(resolve_task(demo.tasks[0].family), demo).box_last_line_only
