"""Evaluation pieces: metrics against hand-computed values, task files read from the shared data,
and malformed task files refused with the file, line and fix named."""

from __future__ import annotations

import pytest
from conftest import DATA

from fundament.errors import InvalidRequestError
from fundament.evals.metrics import accuracy, expected_calibration_error, macro_f1, per_class_f1
from fundament.evals.tasks import load_task

GOLD = ["a", "a", "a", "b", "b", "c"]
PRED = ["a", "a", "b", "b", "c", "c"]


def test_accuracy_and_f1_by_hand():
    assert accuracy(GOLD, PRED) == pytest.approx(4 / 6)
    # a: tp 2, fp 0, fn 1 -> 4/5. b: tp 1, fp 1, fn 1 -> 2/4. c: tp 1, fp 1, fn 0 -> 2/3.
    f1 = per_class_f1(GOLD, PRED, ["a", "b", "c"])
    assert f1 == pytest.approx({"a": 0.8, "b": 0.5, "c": 2 / 3})
    assert macro_f1(GOLD, PRED, ["a", "b", "c"]) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    # A class that is never predicted nor gold still counts in the macro mean, with F1 0.
    assert macro_f1(GOLD, PRED, ["a", "b", "c", "d"]) == pytest.approx((0.8 + 0.5 + 2 / 3) / 4)


def test_expected_calibration_error_by_hand():
    # Bins of width 0.1: 0.95 and 0.91 -> (0.9, 1.0], both right: |1 - 0.93| = 0.07, weight 2/5.
    # 0.62, 0.68 -> (0.6, 0.7], one right: |0.5 - 0.65| = 0.15, weight 2/5.
    # 0.3 -> (0.2, 0.3], wrong: |0 - 0.3| = 0.3, weight 1/5.
    ece = expected_calibration_error([0.95, 0.91, 0.62, 0.68, 0.3], [True, True, True, False, False])
    assert ece == pytest.approx(0.4 * 0.07 + 0.4 * 0.15 + 0.2 * 0.3)
    assert expected_calibration_error([1.0, 1.0], [True, True]) == pytest.approx(0.0)
    assert expected_calibration_error([0.0, 0.5], [False, True]) == pytest.approx(0.5 * 0.5)


def test_metrics_refuse_unequal_lists():
    with pytest.raises(ValueError, match="equally long"):
        accuracy(["a"], ["a", "b"])


@pytest.mark.skipif(not DATA.exists(), reason="the shared data directory is not beside this checkout")
def test_shared_tasks_have_the_published_counts():
    sst2, trec, sms = load_task("sst2"), load_task("trec"), load_task("sms_spam")
    assert (len(sst2.train), len(sst2.test)) == (67349, 872)
    assert sum(e.label == "positive" for e in sst2.test) == 444
    assert (len(trec.train), len(trec.test)) == (5452, 500)
    assert sum(e.label == "abbreviation" for e in trec.test) == 9 and set(trec.classes) == {e.label for e in trec.train}
    assert (len(sms.train), len(sms.test)) == (4459, 1115)
    assert sum(e.label == "spam" for e in sms.train + sms.test) == 747
    assert load_task("sms_spam").test == sms.test  # the split is fixed by its seed
    # The collection repeats messages (5,160 distinct of 5,574), so some test texts are in train too.
    assert sum(e.text in {t.text for t in sms.train} for e in sms.test) == 137


def write_sst2(root, dev: str):
    (root / "sst2").mkdir(parents=True)
    (root / "sst2" / "train.tsv").write_text("sentence\tlabel\ngood film \t1\n")
    (root / "sst2" / "dev.tsv").write_text(dev)


@pytest.mark.parametrize(
    "dev,message",
    [
        ("text\tlabel\na film\t1\n", "dev.tsv line 1: no 'sentence' column"),
        ("sentence\tlabel\na film\t1\nanother\t2\n", "dev.tsv line 3: unknown label '2'"),
        ("sentence\tlabel\na film\n", "dev.tsv line 2: 1 columns"),
    ],
)
def test_malformed_sst2_file_names_file_and_line(tmp_path, dev, message):
    write_sst2(tmp_path, dev)
    with pytest.raises(InvalidRequestError, match=message) as e:
        load_task("sst2", tmp_path)
    assert e.value.param == "data"


def test_malformed_trec_and_sms_files_and_a_missing_file(tmp_path):
    (tmp_path / "trec").mkdir()
    (tmp_path / "trec" / "train_5500.label").write_text("NUM:date When was it ?\nFOO:bar What is this ?\n")
    with pytest.raises(InvalidRequestError, match=r"train_5500.label line 2: unknown label 'FOO'"):
        load_task("trec", tmp_path)
    (tmp_path / "sms_spam").mkdir()
    (tmp_path / "sms_spam" / "SMSSpamCollection").write_text("ham\thello\nspam no tab here\n")
    with pytest.raises(InvalidRequestError, match="line 2: no tab"):
        load_task("sms_spam", tmp_path)
    with pytest.raises(InvalidRequestError, match="FUNDAMENT_DATA"):
        load_task("sst2", tmp_path)
    with pytest.raises(InvalidRequestError, match="unknown task 'mnli'"):
        load_task("mnli", tmp_path)
