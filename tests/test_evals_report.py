"""The report: its tables print the numbers in results.json, the plots are PNG files; metrics of a
cell from its predictions; the remote strategy's label parsing and logprob probabilities."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from fundament.evals.remote import label_probabilities, parse_label
from fundament.evals.report import COLUMNS, verdict_lines, write_report
from fundament.evals.strategies import make, sizes_for
from fundament.evals.summary import cell_metrics, curves, summarize, verdict

PNG = b"\x89PNG\r\n\x1a\n"


def _number(cell: str):
    """'0.875 ± 0.012' -> (0.875, 0.012); '–' -> (None, None)."""
    if cell == "–":
        return None, None
    mean, _, std = cell.partition(" ± ")
    return float(mean), float(std) if std else None


def _tables(section: str) -> list[list[list[str]]]:
    tables, current = [], None
    for line in section.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            current = current if current is not None else []
            current.append([c.strip() for c in line.strip("|").split("|")])
        elif current is not None and not line.startswith("|---"):
            tables.append(current)
            current = None
    return tables + ([current] if current else [])


def assert_report_matches(out: Path) -> dict:
    """Every number in report.md's tables is the one in results.json, rounded as printed."""
    results = json.loads((out / "results.json").read_text())
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    for png in ("learning_curve.png", "accuracy_latency.png"):
        assert (out / png).read_bytes()[:8] == PNG and f"]({png})" in md and f"src='{png}'" in html
    for name, task in results["tasks"].items():
        section = md.split(f"\n## {name}\n", 1)[1].split("\n## ", 1)[0]
        main, per_class = _tables(section)[:2]
        assert main[0][:3] == ["strategy", "n", "seeds"] and main[0][3:] == [h for h, _, _ in COLUMNS]
        assert len(main) - 1 == len(task["rows"]) and len(per_class) - 1 == len(task["rows"])
        for printed, row, pc in zip(main[1:], task["rows"], per_class[1:]):
            assert printed[:3] == [row["strategy"], str(row["size"]), str(len(row["seeds"]))]
            for cell, (_, key, digits) in zip(printed[3:], COLUMNS):
                mean, std = _number(cell)
                if row[key] is None:
                    assert mean is None, (name, row["strategy"], key)
                    continue
                assert mean == pytest.approx(row[key], abs=0.51 * 10**-digits), (
                    name,
                    row["strategy"],
                    row["size"],
                    key,
                )
                if len(row["seeds"]) > 1:
                    assert std == pytest.approx(row[key + "_std"], abs=0.51 * 10**-digits)
                assert cell in html
            assert pc[:2] == [row["strategy"], str(row["size"])]
            for cell, c in zip(pc[2:], task["classes"]):
                assert float(cell) == pytest.approx(row["per_class_f1"][c], abs=0.0006)
        assert f"accuracy {task['majority']['accuracy']:.3f}" in section
    return results


def record(strategy, size, seed, gold, labels, probs, **outcome):
    base = {
        "latencies_s": [0.01, 0.02, 0.03],
        "predict_s": 0.5,
        "train_s": 1.5,
        "peak_memory_mb": 12.0,
        "size_bytes": 2_000_000,
        "info": {},
    }
    return {
        "task": "toy",
        "strategy": strategy,
        "size": size,
        "seed": seed,
        "key": "k",
        "wall_s": 1.0,
        "gold": gold,
        "outcome": {**base, "labels": labels, "probabilities": probs, **outcome},
    }


def test_cell_metrics_from_predictions():
    gold, pred = ["a", "a", "b", "b"], ["a", "b", "b", "b"]
    probs = [{"a": 0.9, "b": 0.1}, {"a": 0.4, "b": 0.6}, {"a": 0.2, "b": 0.8}, {"a": 0.3, "b": 0.7}]
    m = cell_metrics(record("tfidf", 8, 0, gold, pred, probs), ["a", "b"])
    assert m["accuracy"] == 0.75 and m["per_class_f1"] == pytest.approx({"a": 2 / 3, "b": 0.8})
    # confidences 0.9 (right), 0.6 (wrong), 0.8, 0.7 (right): bins of width 0.1, one each
    assert m["ece"] == pytest.approx((0.1 + 0.6 + 0.2 + 0.3) / 4)
    assert (
        m["latency_p50_ms"] == pytest.approx(20) and m["throughput_per_s"] == pytest.approx(8) and m["size_mb"] == 2.0
    )
    assert cell_metrics(record("x", 8, 0, gold, pred, None), ["a", "b"])["ece"] is None


def test_report_tables_and_plots_match_results_json(tmp_path):
    gold = ["a", "b", "a", "b"]
    cells = [
        record(
            "zero-shot",
            0,
            0,
            gold,
            ["a", "a", "a", "b"],
            [{"a": 0.7, "b": 0.3}] * 4,
            train_s=None,
            size_bytes=None,
            peak_memory_mb=None,
        )
    ]
    for seed, labels in ((0, ["a", "b", "a", "a"]), (1, ["a", "b", "b", "b"])):
        cells.append(record("few-shot-random", 8, seed, gold, labels, [{"a": 0.6, "b": 0.4}] * 4, train_s=None))
        cells.append(record("tfidf", 8, seed, gold, labels, None, latencies_s=[0.001 * (seed + 1)]))
    for c in cells:
        c["metrics"] = cell_metrics(c, ["a", "b"])
    rows = summarize(cells, ["a", "b"])
    strategies = [make(n) for n in ("zero-shot", "few-shot-random", "tfidf")]
    task = {
        "classes": ["a", "b"],
        "train_size": 100,
        "test_split": "test",
        "test_size": 10,
        "n_test": 4,
        "limit": 4,
        "majority": {"label": "a", "accuracy": 0.5, "macro_f1": 1 / 3},
        "skipped": {"lora": [8]},
        "rows": rows,
        "curves": curves(rows, strategies),
        "cells": [],
    }
    cfg = {
        "tasks": ["toy.yaml"],
        "strategies": ["zero-shot", "few-shot-random", "tfidf"],
        "sizes": [0, 8],
        "seeds": [0, 1],
        "limit": 4,
        "k": 8,
        "model": "smollm2-135m-instruct",
        "embedding_model": "all-minilm-l6-v2",
        "remote_base_url": None,
        "remote_model": None,
        "lora_epochs": "auto",
        "lora_r": None,
        "latency_sample": 20,
        "out": str(tmp_path),
    }
    results = {
        "config": cfg,
        "wall_s": 60.0,
        "cells_wall_s": 120.0,
        "finished": "2026-01-01 00:00:00",
        "errors": [],
        "strategies": {"zero-shot": "z", "few-shot-random": "f", "tfidf": "t"},
        "tasks": {"toy": task},
    }
    write_report(results, tmp_path)
    back = assert_report_matches(tmp_path)
    assert [p["size"] for p in back["tasks"]["toy"]["curves"]["few-shot-random"]] == [0, 8]  # starts from zero-shot
    assert back["tasks"]["toy"]["curves"]["few-shot-random"][1]["accuracy"] == pytest.approx(
        0.75
    )  # mean of 0.75 and 0.75
    md = (tmp_path / "report.md").read_text()
    assert (
        "fundament eval --task toy.yaml --strategies zero-shot,few-shot-random,tfidf --sizes 0,8 --seeds 0,1 --limit 4"
        in md
    )
    assert "a seeded sample of 4 of the 10 test examples" in md
    assert "lora did not run at 8 examples: the fine-tuning jobs API needs at least 10" in md
    assert re.search(r"\| tfidf \| 8 \| 2 \| 0\.750 ± 0\.000 \|", md)
    assert "the cells' compute time 2.0 min; this run's wall time 1.0 min" in md  # no cell counts: every cell computed
    for computed, says in (
        (0, "all 5 cells read back from the cache"),
        (2, "this run computed 2 of 5 cells in 1.0 min, the rest read back"),
    ):
        write_report({**results, "cells": 5, "cells_computed": computed}, tmp_path)
        assert says in (tmp_path / "report.md").read_text()


def test_sizes_each_strategy_runs_at():
    assert sizes_for(make("zero-shot"), [0, 8, 32], 1000) == ([0], [])
    assert sizes_for(make("few-shot-random"), [0, 8, 32], 1000) == ([8, 32], [])  # its 0 is zero-shot's cell
    assert sizes_for(make("lora"), [0, 8, 32, 2048], 1000) == ([32, 1000], [8])  # capped at the train split
    assert sizes_for(make("tfidf"), [0, 8], 1000) == ([8], [])


def tok(token, logprob, top=()):
    return SimpleNamespace(
        token=token, logprob=logprob, top_logprobs=[SimpleNamespace(token=t, logprob=lp) for t, lp in top]
    )


def test_remote_label_parsing_and_probabilities_from_top_logprobs():
    classes = ["positive", "negative"]
    assert parse_label("The review is positive.", classes, "The review is") == ("positive", 14)
    assert parse_label("negative", classes, "The review is") == ("negative", 0)
    assert parse_label("I think it's clearly Negative overall", classes, "") == ("negative", 21)
    assert parse_label("no idea", classes, "Answer:") == ("", -1)
    # "The review is" then " positive": the alternatives at the label's token give the probabilities
    tokens = [
        tok("The", -0.1),
        tok(" review", -0.1),
        tok(" is", -0.1),
        tok(" positive", -0.4, [(" positive", -0.4), (" negative", -1.2), (" neutral", -3.0), (" pos", -4.0)]),
    ]
    import math

    p = label_probabilities(tokens, 14, classes)
    pos, neg = math.exp(-0.4) + math.exp(-4.0), math.exp(-1.2)
    assert p == pytest.approx({"positive": pos / (pos + neg), "negative": neg / (pos + neg)})
    assert label_probabilities([tok(" maybe", -0.1, [(" maybe", -0.1), (" unsure", -1.0)])], 0, classes) is None


def test_fundament_eval_command_on_a_task_file(tmp_path, capsys):
    from fundament.cli import main

    words = {
        "good": ["great", "lovely", "superb", "fine", "wonderful"],
        "bad": ["awful", "dull", "poor", "boring", "ugly"],
    }
    rows = [{"text": f"a {w} film, {v} acting", "label": label} for label, ws in words.items() for w in ws for v in ws]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "task.yaml").write_text("name: films\nlabels: [good, bad]\nfile: data.jsonl\ntest_fraction: 0.3\n")
    out = tmp_path / "report"
    args = [
        "eval",
        "--task",
        str(tmp_path / "task.yaml"),
        "--strategies",
        "tfidf",
        "--sizes",
        "0,4,16",
        "--seeds",
        "0,1",
        "--out",
        str(out),
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == str(out / "report.md")
    results = assert_report_matches(out)
    rows = {(r["strategy"], r["size"]): r for r in results["tasks"]["films"]["rows"]}
    assert set(rows) == {("tfidf", 4), ("tfidf", 16)} and rows[("tfidf", 16)]["seeds"] == [0, 1]
    assert rows[("tfidf", 16)]["accuracy"] > 0.8  # the words give the label away
    best = results["tasks"]["films"]["verdict"]["best"]
    assert (
        best["strategy"] == "tfidf"
        and f"- Best: tfidf, {best['size']} examples: accuracy {best['accuracy']:.3f}"
        in (out / "report.md").read_text()
    )
    (tmp_path / "bad.jsonl").write_text('{"text": "x", "label": "good"}\n{"text": "y", "label": "meh"}\n')
    (tmp_path / "bad.yaml").write_text("labels: [good, bad]\nfile: bad.jsonl\n")
    assert main(["eval", "--task", str(tmp_path / "bad.yaml"), "--strategies", "tfidf", "--out", str(out)]) == 2
    assert "bad.jsonl line 2, column 'label': unknown label 'meh'" in capsys.readouterr().err


def _row(strategy, size, acc, p50, train=None):
    return {"strategy": strategy, "size": size, "accuracy": acc, "latency_p50_ms": p50, "train_s": train}


def test_verdict_names_the_winner_where_fine_tuning_overtakes_and_whether_a_small_model_suffices():
    rows = [
        _row("zero-shot", 0, 0.715, 81),
        _row("few-shot-nearest", 8, 0.705, 189),
        _row("few-shot-nearest", 512, 0.72, 305),
        _row("lora", 32, 0.70, 149, 142),
        _row("lora", 128, 0.88, 138, 450),
        _row("lora", 512, 0.92, 144, 466),
        _row("probe-embedding", 512, 0.905, 16, 2),
        _row("tfidf", 512, 0.595, 0.4, 0.1),
    ]
    v = verdict(rows)
    assert (v["best"]["strategy"], v["best"]["size"]) == ("lora", 512)
    # lora at 32 loses to zero-shot; at 128 it beats every prompt with 128 examples or fewer
    assert (v["fine_tuning_overtakes"]["size"], v["fine_tuning_overtakes"]["best_prompt_accuracy"]) == (128, 0.715)
    assert v["fastest_close_to_best"]["strategy"] == "probe-embedding"  # 0.905 is within 0.02 of 0.92, at 16 ms
    assert {f: r["strategy"] for f, r in v["families"].items()} == {
        "prompting": "few-shot-nearest",
        "fine-tuning": "lora",
        "probe": "probe-embedding",
        "from scratch": "tfidf",
    }
    words = " ".join(verdict_lines(v))
    assert "Best: lora, 512 examples: accuracy 0.920, p50 144 ms per example, 466 s of training." in words
    assert "Fine-tuning beats every prompt from 128 labelled examples on" in words
    assert "0.325 below the best: here the foundation model is worth it" in words

    easy = verdict(
        [
            _row("zero-shot", 0, 0.80, 80),
            _row("lora", 32, 0.79, 140, 100),
            _row("tfidf", 512, 0.985, 0.4),
            _row("lora", 512, 0.99, 140, 400),
        ]
    )
    words = " ".join(verdict_lines(easy))
    assert "comes within 0.02 of the best (tfidf 0.985): for this task it suffices" in words
    assert easy["fastest_close_to_best"]["strategy"] == "tfidf"
    assert verdict([_row("zero-shot", 0, 0.8, 80), _row("lora", 32, 0.7, 140, 100)])["fine_tuning_overtakes"] is None


def test_prompts_introduce_the_input_as_the_task_does_and_that_enters_only_their_cache_keys(tmp_path, monkeypatch):
    from fundament.evals import runner
    from fundament.evals.prompting import request_body
    from fundament.evals.tasks import Example, Task

    train = [Example("a fine film", "good"), Example("dull", "bad")]
    task = Task(
        "films",
        ["good", "bad"],
        "Is the review good or bad?",
        "The review is",
        train,
        train,
        "test",
        input_prefix="Review:",
    )
    assert request_body(task, "m", [], 0, None, 0)["input_prefix"] == "Review:"
    assert "input_prefix" not in request_body(
        task, "m", [], 0, None, 0, input_prefix=False
    )  # LoRA: as its training data
    # The zero-shot SMS prompt without "Message:" scored 0.46 on 100 test messages, with it 0.78.

    keys = {}

    class Cache:
        def get(self, *cell):
            keys[(cell[1], task.input_prefix)] = cell[4]
            return {"cached": True}

    backend = {"m": "fundament"}
    ctx = SimpleNamespace(
        config=SimpleNamespace(latency_sample=1, model="m", k=8, embedding_model="e", example_format="list"),
        fundament=SimpleNamespace(backend=lambda model: backend[model]),
    )
    monkeypatch.setattr(runner, "train_subset", lambda task, size, seed: train)
    for prefix in ("Review:", "Text:"):
        task.input_prefix = prefix
        for name in ("zero-shot", "few-shot-nearest", "tfidf"):
            runner._run_cell(ctx, Cache(), task, make(name), 8, 0, train)
    assert keys[("zero-shot", "Review:")] != keys[("zero-shot", "Text:")]
    assert keys[("few-shot-nearest", "Review:")] != keys[("few-shot-nearest", "Text:")]
    assert keys[("tfidf", "Review:")] == keys[("tfidf", "Text:")]
    # A model served by vLLM scores differently from fundament's engine: its cells are its own
    on_engine = keys[("zero-shot", "Text:")]
    backend["m"] = "vllm"
    runner._run_cell(ctx, Cache(), task, make("zero-shot"), 8, 0, train)
    assert keys[("zero-shot", "Text:")] != on_engine
