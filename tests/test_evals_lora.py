"""The LoRA strategy end to end through the jobs system, on a `fundament serve` the evaluation starts
itself (and stops by its pid): upload, job, worker, the ft: model scored by /v1/classifications."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import DATA

from fundament.evals import server as eval_server
from fundament.evals.config import EvalConfig
from fundament.evals.runner import evaluate

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not DATA.exists(), reason="the shared data directory is not beside this checkout"),
]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_lora_fine_tunes_through_the_jobs_api_and_changes_the_probabilities(tmp_path, server, monkeypatch):
    home = Path(os.environ["FUNDAMENT_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    stopped = []
    real_stop = eval_server.LocalServer.stop

    def stop(self):
        stopped.append((self.pid, self.worker_pid()))
        real_stop(self)

    monkeypatch.setattr(eval_server.LocalServer, "stop", stop)
    cfg = EvalConfig(
        tasks=["sms_spam"],
        strategies=["lora"],
        sizes=[0, 8, 10],
        seeds=[0],
        limit=16,
        latency_sample=2,
        lora_epochs=1,
        out=tmp_path / "report",
        cache_dir=tmp_path / "cache",
    )
    results = evaluate(cfg)

    assert results["errors"] == []
    task = results["tasks"]["sms_spam"]
    assert task["skipped"] == {"lora": [8]}  # the jobs API needs 10 examples
    rows = {(r["strategy"], r["size"]): r for r in task["rows"]}
    assert set(rows) == {("zero-shot", 0), ("lora", 10)}  # lora's 0-example point is the base model zero-shot
    assert [p["size"] for p in task["curves"]["lora"]] == [0, 10]
    lora = rows[("lora", 10)]
    assert lora["train_s"] > 0 and lora["ece"] is not None
    assert 1 < lora["size_mb"] < 100  # the adapter directory, r=16 on every linear layer: ~20 MB
    assert lora["peak_memory_mb"] > 100  # the worker loaded and trained the model

    records = {
        r["strategy"]: r for r in (json.loads(p.read_text()) for p in (tmp_path / "cache" / "results").rglob("*.json"))
    }
    info = records["lora"]["outcome"]["info"]
    assert info["fine_tuned_model"].startswith("ft:smollm2-135m-instruct:") and info["job"].startswith("ftjob-")
    assert info["hyperparameters"]["n_epochs"] == 1
    # the fine-tuned model answers with other probabilities than the base model, on the same inputs
    base, tuned = records["zero-shot"]["outcome"]["probabilities"], records["lora"]["outcome"]["probabilities"]
    assert records["zero-shot"]["gold"] == records["lora"]["gold"]
    assert max(abs(a["spam"] - b["spam"]) for a, b in zip(base, tuned)) > 0.01
    assert not (home / "fine_tuning" / info["job"]).exists()  # the ft: model deleted once scored

    ((pid, worker),) = stopped
    assert worker is not None and _gone(pid) and _gone(worker)
