"""Every strategy but LoRA (test_evals_lora.py) end to end on a slice of SST-2, against the session's
real `fundament serve` (prompting, embeddings) and that same server as the "remote" OpenAI-compatible
model; then the report's numbers against results.json, and a rerun that computes only new cells."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import DATA
from test_evals_report import assert_report_matches

from fundament.evals.config import EvalConfig
from fundament.evals.runner import evaluate

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not DATA.exists(), reason="the shared data directory is not beside this checkout"),
]

STRATEGIES = [
    "zero-shot",
    "few-shot-random",
    "few-shot-nearest",
    "probe-embedding",
    "probe-hidden",
    "tfidf",
    "remote-zero-shot",
    "remote-few-shot-random",
]


def _config(server, root: Path, **over) -> EvalConfig:
    settings = dict(
        tasks=["sst2"],
        strategies=STRATEGIES,
        sizes=[0, 8],
        seeds=[0],
        limit=24,
        latency_sample=2,
        base_url=server.base_url,
        remote_base_url=server.base_url,
        remote_model="smollm2-135m-instruct",
        out=root / "report",
        cache_dir=root / "cache",
    )
    return EvalConfig(**{**settings, **over})


@pytest.fixture(scope="module")
def run(server, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    home = root / "home"
    home.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FUNDAMENT_HOME", str(home))
        results = evaluate(_config(server, root))
    return root, results


def _records(root: Path) -> dict[tuple[str, int], dict]:
    out = {}
    for p in (root / "cache" / "results" / "sst2").rglob("*.json"):
        r = json.loads(p.read_text())
        out[(r["strategy"], r["size"])] = r
    return out


def test_every_strategy_runs_on_the_same_slice(run):
    root, results = run
    assert results["errors"] == []
    task = results["tasks"]["sst2"]
    rows = {(r["strategy"], r["size"]): r for r in task["rows"]}
    assert set(rows) == {("zero-shot", 0), ("remote-zero-shot", 0)} | {
        (s, 8) for s in STRATEGIES if "zero-shot" not in s
    }
    records = _records(root)
    gold = records[("zero-shot", 0)]["gold"]
    assert len(gold) == task["n_test"] == 24
    for (name, _size), r in records.items():
        assert r["gold"] == gold, name  # every strategy is scored on the same test examples
        out = r["outcome"]
        assert len(out["labels"]) == 24 and set(out["labels"]) <= {"negative", "positive", ""}
        assert len(out["latencies_s"]) == 2 and all(t > 0 for t in out["latencies_s"])
        if out["probabilities"] is not None:
            assert all(sum(p.values()) == pytest.approx(1, abs=1e-6) for p in out["probabilities"]), name
    # The real 135M model prompted zero-shot beats always answering one class on SST-2 (full dev:
    # accuracy 0.725 against 0.509, float32 and the bf16 default alike). This slice is 16 of 24
    # one class, so accuracy against the majority's hangs on one example; macro-F1 does not.
    assert rows[("zero-shot", 0)]["accuracy"] >= 0.6
    assert rows[("zero-shot", 0)]["macro_f1"] >= 0.6 > task["majority"]["macro_f1"]
    assert records[("few-shot-nearest", 8)]["outcome"]["info"]["k"] == 8
    for name, dims in (("probe-embedding", 384), ("probe-hidden", 576), ("tfidf", None)):
        r = rows[(name, 8)]
        assert r["train_s"] > 0 and r["size_mb"] > 0 and r["ece"] is not None
        if dims:
            assert records[(name, 8)]["outcome"]["info"]["dimensions"] == dims
    for name in ("zero-shot", "few-shot-random"):
        assert rows[(name, 0 if name == "zero-shot" else 8)]["train_s"] is None  # nothing trained
    remote = records[("remote-few-shot-random", 8)]["outcome"]
    assert remote["info"]["logprobs"] is True and remote["probabilities"] is not None
    assert records[("remote-zero-shot", 0)]["outcome"]["info"]["model"] == "smollm2-135m-instruct"
    # few-shot's learning curve starts from the zero-shot point
    assert [p["size"] for p in task["curves"]["few-shot-random"]] == [0, 8]
    assert task["curves"]["few-shot-random"][0]["accuracy"] == rows[("zero-shot", 0)]["accuracy"]


def test_report_numbers_match_the_json(run):
    root, results = run
    back = assert_report_matches(root / "report")
    assert back["tasks"]["sst2"]["rows"] == results["tasks"]["sst2"]["rows"]
    assert "a seeded sample of 24 of the 872 dev examples" in (root / "report" / "report.md").read_text()


def test_a_rerun_computes_only_the_cells_that_changed(run, server, monkeypatch):
    root, first = run
    monkeypatch.setenv("FUNDAMENT_HOME", str(root / "home"))
    before = {p: p.stat().st_mtime_ns for p in (root / "cache" / "results").rglob("*.json")}
    again = evaluate(_config(server, root, strategies=["zero-shot", "tfidf"], sizes=[0, 8, 16], out=root / "report2"))
    after = {p: p.stat().st_mtime_ns for p in (root / "cache" / "results").rglob("*.json")}
    new = sorted(p.relative_to(root / "cache" / "results").as_posix() for p in set(after) - set(before))
    assert len(new) == 1 and new[0].startswith("sst2/tfidf/n16-s0-")
    assert all(after[p] == t for p, t in before.items())  # read back, not recomputed
    rows = {(r["strategy"], r["size"]): r for r in again["tasks"]["sst2"]["rows"]}
    firsts = {(r["strategy"], r["size"]): r for r in first["tasks"]["sst2"]["rows"]}
    assert rows[("tfidf", 8)] == firsts[("tfidf", 8)] and rows[("zero-shot", 0)] == firsts[("zero-shot", 0)]
