"""load_examples on verl-layout files beyond the three released sets: math rows, globs, errors."""

from __future__ import annotations

import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mtgrpo_jax.tasks import PROMPT_PREFIX, PROMPT_SUFFIX, get_task, load_examples


def _math_rows():
    def row(i, key, text, answer, source, kind):
        extra = {"difficulty": 2.0, "index": i, key: text, "split": "test"}
        if kind is not None:
            extra["type"] = kind
        body = f"{text} Put your final answer within \\boxed{{}}. "
        return {
            "data_source": source,
            "prompt": [{"content": PROMPT_PREFIX + body + PROMPT_SUFFIX, "role": "user"}],
            "ability": "math",
            "reward_model": {"ground_truth": answer, "style": "rule"},
            "extra_info": extra,
        }

    # the released math files: `type` holds the subject, the bare question is `question` or `problem`
    return [
        row(0, "question", "What is $\\frac{2}{4}$?", "\\frac{1}{2}", "math_train", "Algebra"),
        row(1, "problem", "Compute $2+3$.", "5", "test_aime", None),
    ]


def test_math_rows_load_and_score(tmp_path):
    path = tmp_path / "math.parquet"
    pq.write_table(pa.Table.from_pylist(_math_rows()), path)
    examples = load_examples(str(path))
    assert [e["task"] for e in examples] == ["math", "math"]  # from data_source / ability, not the subject
    assert examples[0]["difficulty"] == 2 and isinstance(examples[0]["difficulty"], int)
    assert examples[1]["question"] == "Compute $2+3$." and examples[1]["answer"] == "5"
    task = get_task("math")
    for e in examples:
        assert task.prompt(e) == e["prompt"]
        assert task.score(task.demonstration(e), e).reward == 1.0
    assert task.score("\\boxed{0.5}", examples[0]).correct


def test_paths_globs_filters_and_forced_task(tmp_path, released_dir):
    both = load_examples([f"{released_dir}/test_zebra.parquet", f"{released_dir}/test_arc.parquet"], difficulty=[1, 4])
    assert len(both) == 800 and {e["difficulty"] for e in both} == {1, 4}
    assert len(load_examples(f"{released_dir}/test_*.parquet", difficulty=3)) == 600
    folder = tmp_path / "released"  # a directory of the three released test sets (the repo's also holds MATH)
    folder.mkdir()
    for name in ("test_countdown.parquet", "test_zebra.parquet", "test_arc.parquet"):
        shutil.copy(os.path.join(released_dir, name), folder / name)
    assert len(load_examples(str(folder))) == 2400  # a directory
    forced = load_examples(f"{released_dir}/test_zebra.parquet", task="zebra", difficulty=2)
    assert len(forced) == 200 and forced[0]["task"] == "zebra"


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_examples(str(tmp_path / "missing.parquet"))
    with pytest.raises(FileNotFoundError):
        load_examples(str(tmp_path))  # no parquet files in the directory
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": "hello"}]), bad)
    with pytest.raises(ValueError, match="not a verl-layout"):
        load_examples(str(bad))
    rows = _math_rows()
    rows[0]["data_source"], rows[0]["ability"], rows[0]["extra_info"]["type"] = "mystery", "riddles", "Riddle"
    unknown = tmp_path / "unknown.parquet"
    pq.write_table(pa.Table.from_pylist(rows[:1]), unknown)
    with pytest.raises(ValueError, match="cannot tell the task"):
        load_examples(str(unknown))
    assert load_examples(str(unknown), task="math")[0]["task"] == "math"
    with pytest.raises(ValueError, match="unknown task"):
        load_examples(str(unknown), task="riddles")


def test_any_layout_with_mapped_columns_and_clear_errors(tmp_path):
    import json

    from mtgrpo_jax.tasks import load_source
    from mtgrpo_jax.tasks.loading import is_hub_id

    rows = [{"q": "What is 2 + 3?", "a": "5"}, {"q": "What is 4 * 2?", "a": 8}]
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "part.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = load_source(
        {"path": str(tmp_path / "set"), "columns": {"question": "q", "answer": "a"}}, task="arithmetic"
    )
    assert [(e["task"], e["question"], e["answer"]) for e in examples] == [
        ("arithmetic", "What is 2 + 3?", "5"),
        ("arithmetic", "What is 4 * 2?", "8"),
    ]
    assert get_task("arithmetic").score("\\boxed{8}", examples[1]).correct
    with pytest.raises(ValueError, match="not a verl-layout file"):
        load_examples(tmp_path / "set")  # no task family named for rows that do not name theirs
    with pytest.raises(ValueError, match="no column 'question'"):
        load_source(str(tmp_path / "set"), task="arithmetic")
    with pytest.raises(ValueError, match="unknown example field"):
        load_examples(tmp_path / "set", task="arithmetic", columns={"prompt": "q"})
    with pytest.raises(ValueError, match="unknown source keys"):
        load_source({"path": str(tmp_path / "set"), "colums": {}}, task="arithmetic")
    assert is_hub_id("openai/gsm8k") and is_hub_id("gsm8k")
    assert not is_hub_id(str(tmp_path / "set")) and not is_hub_id("data/missing.parquet") and not is_hub_id("/abs/x")
