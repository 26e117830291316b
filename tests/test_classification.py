"""POST /v1/classifications end to end on the real default model, and the Classifier's checks."""

from __future__ import annotations

import pytest
from conftest import post

pytestmark = pytest.mark.slow

LABELS = ["positive", "negative"]
CLEAR = [
    ("a charming , funny and moving film , one of the best of the year .", "positive"),
    ("a masterpiece , brilliant and beautiful from start to finish .", "positive"),
    ("this is a dull , boring and lifeless mess , the worst film i have seen .", "negative"),
    ("awful , stupid and painfully bad in every way .", "negative"),
]


def classify(server, **body):
    return post(server, "/classifications", {"model": "gpt-4o-mini", "labels": LABELS, **body})


def test_probabilities_sum_to_one_and_clear_cases_are_right(server):
    r = classify(
        server,
        input=[t for t, _ in CLEAR],
        instruction="Classify the sentiment of the movie review.",
        answer_prefix="The review is",
    )
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["index"] for d in data] == list(range(len(CLEAR)))
    for d, (_, gold) in zip(data, CLEAR):
        assert set(d["probabilities"]) == set(LABELS)
        assert sum(d["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
        assert d["label"] == max(d["probabilities"], key=d["probabilities"].get)
        assert d["label"] == gold, d
    assert r.json()["usage"]["prompt_tokens"] > 0


def test_nearest_examples_are_chosen_by_similarity(server):
    pool = [
        {"input": "the soundtrack is gorgeous", "label": "positive"},
        {"input": "the tax code is complicated", "label": "negative"},
        {"input": "a gorgeous , soaring soundtrack", "label": "positive"},
        {"input": "parliament passed the budget", "label": "negative"},
    ]
    r = classify(server, input="what a gorgeous soundtrack !", examples=pool, k=2, selection="nearest")
    assert r.status_code == 200, r.text
    assert sorted(r.json()["data"][0]["examples"]) == [0, 2]
    r = classify(server, input="what a gorgeous soundtrack !", examples=pool, k=2, selection="random", seed=3)
    again = classify(server, input="what a gorgeous soundtrack !", examples=pool, k=2, selection="random", seed=3)
    assert r.json()["data"][0]["examples"] == again.json()["data"][0]["examples"]


def test_batch_calibrated_ensemble_in_either_example_format(server):
    pool = [
        {"input": "a warm , funny film", "label": "positive"},
        {"input": "tedious and flat", "label": "negative"},
        {"input": "a triumph", "label": "positive"},
        {"input": "a waste of time", "label": "negative"},
    ]
    for fmt in ("list", "turns"):
        r = classify(
            server,
            input=[t for t, _ in CLEAR],
            instruction="Classify the sentiment of the movie review.",
            answer_prefix="The review is",
            input_prefix="Review:",
            examples=pool,
            k=[0, 2],
            calibrate="batch",
            example_format=fmt,
        )
        assert r.status_code == 200, r.text
        for d, (_, gold) in zip(r.json()["data"], CLEAR):
            assert sum(d["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
            assert d["label"] == gold and len(d["examples"]) == 2, d


def test_multi_token_labels_are_scored_whole(server):
    r = classify(
        server,
        input="Who wrote Hamlet?",
        labels=["a person", "a location", "a number"],
        instruction="What kind of answer does the question ask for?",
    )
    probs = r.json()["data"][0]["probabilities"]
    assert set(probs) == {"a person", "a location", "a number"} and sum(probs.values()) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(
    "body,param",
    [
        ({"input": "x", "labels": []}, "labels"),
        ({"input": "x", "labels": ["yes"]}, "labels"),
        ({"input": "x", "labels": ["yes", "no", "yes"]}, "labels"),
        ({"input": "x", "labels": ["yes", "word " * 9000]}, "labels"),
        ({"input": "x", "examples": [{"input": "word " * 9000, "label": "positive"}]}, "examples"),
        ({"input": "x", "examples": [{"input": "a", "label": "maybe"}]}, "examples"),
        ({"input": "x", "examples": [{"input": "a", "label": "positive"}], "k": 3}, "k"),
        ({"input": []}, "input"),
        ({"input": "x", "selection": "best"}, "selection"),
        ({"input": "x", "calibrate": "platt"}, "calibrate"),
        ({"input": "x", "calibrate": "batch"}, "calibrate"),
        ({"input": "x", "example_format": "grid"}, "example_format"),
        ({"input": "x", "examples": [{"input": "a", "label": "positive"}], "k": [0, 3]}, "k"),
    ],
)
def test_bad_input_is_400_with_param(server, body, param):
    r = classify(server, **body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_cli_classify_prints_json_lines_and_refuses_bad_labels(smollm_dir):
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, FUNDAMENT_HOME=str(smollm_dir.parents[2]))
    cmd = [
        sys.executable,
        "-m",
        "fundament.cli",
        "classify",
        "--labels",
        "positive,negative",
        "--answer-prefix",
        "The review is",
        "--instruction",
        "Classify the sentiment of the movie review.",
        "a gorgeous , moving film",
        "a dull and lifeless mess",
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["label"] for r in rows] == ["positive", "negative"]
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-6 for r in rows)
    bad = subprocess.run(cmd[:5] + ["positive,positive", "x"], env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "duplicate" in bad.stderr.splitlines()[-1]
