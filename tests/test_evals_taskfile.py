"""Task definition files (JSONL, CSV, TSV data; YAML or JSON definitions) read into tasks, every
problem refused with the file, line and column named; the seeded training subsets and test sample."""

from __future__ import annotations

import json

import pytest

from fundament.errors import InvalidRequestError
from fundament.evals.splits import held_out, subset_order, train_subset
from fundament.evals.taskfile import load_task_file, resolve_task
from fundament.evals.tasks import Example, Task


def write_task(tmp_path, train: str, test: str, ext: str = "jsonl", **settings) -> str:
    (tmp_path / f"train.{ext}").write_text(train)
    (tmp_path / f"test.{ext}").write_text(test)
    defn = {
        "name": "reviews",
        "instruction": "Classify the review.",
        "answer_prefix": "The review is",
        "labels": {"good": "a favourable review", "bad": ""},
        "splits": {"train": f"train.{ext}", "test": f"test.{ext}"},
        **settings,
    }
    path = tmp_path / "task.json"
    path.write_text(json.dumps(defn))
    return str(path)


def jsonl(*rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_jsonl_task_reads_labels_descriptions_and_splits(tmp_path):
    path = write_task(
        tmp_path,
        jsonl({"text": "loved it", "label": "good"}, {"text": "awful", "label": "bad"}),
        jsonl({"text": "fine", "label": "good"}),
    )
    task = load_task_file(path)
    assert task.name == "reviews" and task.classes == ["good", "bad"] and task.answer_prefix == "The review is"
    assert task.descriptions == {"good": "a favourable review"}
    assert [(e.text, e.label) for e in task.train] == [("loved it", "good"), ("awful", "bad")]
    assert [(e.text, e.label) for e in task.test] == [("fine", "good")]
    assert resolve_task(path).train == task.train


def test_csv_and_tsv_with_other_columns_and_a_label_map(tmp_path):
    (tmp_path / "all.csv").write_text(
        'id,review,stars\n1,"great, really",1\n2,meh,0\n3,superb,1\n4,bad,0\n5,"multi\nline",1\n'
    )
    (tmp_path / "task.yaml").write_text(
        "labels: [good, bad]\ntext_column: review\nlabel_column: stars\nlabel_map: {'1': good, '0': bad}\n"
        "file: all.csv\ntest_fraction: 0.4\nsplit_seed: 3\n"
    )
    task = load_task_file(tmp_path / "task.yaml")
    assert len(task.train) == 3 and len(task.test) == 2
    assert sorted(e.text for e in task.train + task.test) == sorted(
        ["great, really", "meh", "superb", "bad", "multi\nline"]
    )
    assert {e.text: e.label for e in task.train + task.test}["meh"] == "bad"
    assert load_task_file(tmp_path / "task.yaml").test == task.test  # the split is fixed by its seed
    write_task(tmp_path, "text\tlabel\nnice\tgood\nugly\tbad\n", "text\tlabel\nok\tgood\n", ext="tsv")
    assert [e.label for e in load_task_file(tmp_path / "task.json").train] == ["good", "bad"]


@pytest.mark.parametrize(
    "train,test,ext,message",
    [
        (
            jsonl({"text": "a", "label": "good"}, {"txt": "b", "label": "bad"}),
            jsonl({"text": "c", "label": "good"}),
            "jsonl",
            r"train.jsonl line 2: no 'text' column",
        ),
        (
            "text,label\na,good\n",
            "text,category\nb,bad\n",
            "csv",
            r"test.csv line 1: no 'label' column \(the header has \['text', 'category'\]\)",
        ),
        (
            "text\tlabel\na\tgood\nb\tugly\n",
            "text\tlabel\nc\tgood\n",
            "tsv",
            r"train.tsv line 3, column 'label': unknown label 'ugly'; the task's labels are \['good', 'bad'\]",
        ),
        (jsonl({"text": "a", "label": "good"}), "\n", "jsonl", r"the test split \(.*test.jsonl\) has no examples"),
        (
            jsonl({"text": "a", "label": "good"}) + "{oops\n",
            jsonl({"text": "c", "label": "good"}),
            "jsonl",
            r"train.jsonl line 2: not JSON",
        ),
        ("text,label\na,good,extra\n", "text,label\nb,bad\n", "csv", r"train.csv line 2: 3 columns, the header has 2"),
        (
            jsonl({"text": " ", "label": "good"}),
            jsonl({"text": "c", "label": "good"}),
            "jsonl",
            r"train.jsonl line 1, column 'text': the text is empty",
        ),
    ],
)
def test_bad_task_files_name_file_line_and_column(tmp_path, train, test, ext, message):
    path = write_task(tmp_path, train, test, ext)
    with pytest.raises(InvalidRequestError, match=message) as e:
        load_task_file(path)
    assert e.value.param == "task"


def test_bad_definitions_say_what_to_fix(tmp_path):
    ok = jsonl({"text": "a", "label": "good"})
    with pytest.raises(InvalidRequestError, match="unknown setting 'lables'"):
        load_task_file(write_task(tmp_path, ok, ok, lables=["x"]))
    with pytest.raises(InvalidRequestError, match="at least two distinct labels"):
        load_task_file(write_task(tmp_path, ok, ok, labels=["good"]))
    with pytest.raises(InvalidRequestError, match=r"unknown format '.txt'"):
        load_task_file(write_task(tmp_path, ok, ok, ext="txt"))
    with pytest.raises(InvalidRequestError, match="no such task file .*built-in task: sst2, trec, sms_spam"):
        resolve_task(str(tmp_path / "nope.yaml"))


def toy_task(n_per_class: dict[str, int]) -> Task:
    train = [Example(f"{c} {i}", c) for c, n in n_per_class.items() for i in range(n)]
    return Task(
        "toy", list(n_per_class), "Classify.", "Answer:", train, [Example(f"t{i}", "a") for i in range(50)], "test"
    )


def test_training_subsets_are_seeded_nested_and_hold_every_class():
    task = toy_task({"a": 200, "b": 5, "c": 3})
    s8, s32 = train_subset(task, 8, seed=1), train_subset(task, 32, seed=1)
    assert s32[:8] == s8  # nested: the learning curve adds examples, it does not redraw them
    assert {e.label for e in s8} == {"a", "b", "c"} and {e.label for e in s8[:3]} == {"a", "b", "c"}
    assert train_subset(task, 8, seed=1) == s8 and train_subset(task, 8, seed=2) != s8
    assert sorted(subset_order(task.train, task.classes, 0)) == list(range(len(task.train)))  # a permutation


def test_limit_draws_the_same_test_sample_in_split_order():
    task = toy_task({"a": 3, "b": 3})
    sample = held_out(task, 10)
    assert len(sample) == 10 and sample == held_out(task, 10)
    idx = [task.test.index(e) for e in sample]
    assert idx == sorted(idx) and idx != list(range(10))
    assert held_out(task, None) == task.test and held_out(task, 500) == task.test
