"""The JobStore on a real SQLite file: pagination, conditional field updates, fine-tuned model
records. (Status changes are tests/test_jobs_lifecycle.py's.)"""

from __future__ import annotations

import pytest

from fundament.errors import InvalidRequestError
from fundament.jobs import lifecycle
from fundament.jobs.lifecycle import Status
from fundament.jobs.store import JobStore


@pytest.fixture
def store(tmp_path):
    return JobStore(tmp_path / "fundament.sqlite3")


def make_job(store, tmp_path, **kw):
    args = dict(model="m", base_model="m", training_file="file-1", validation_file=None, suffix=None, seed=3,
                metadata=None, hyperparameters={"n_epochs": "auto"}, extensions={}, out_root=tmp_path / "ft")
    return store.create_job(**{**args, **kw})


def test_wal_mode_and_schema(store):
    import sqlite3

    c = sqlite3.connect(store.path)
    assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table'")} >= {"files", "jobs", "events", "checkpoints"}


def test_file_pages_in_both_orders_with_has_more(store):
    ids = [store.add_file(f"file-{i}", f"f{i}.jsonl", "fine-tune" if i % 2 else "batch", 10 + i)["id"] for i in range(5)]
    page, more = store.list_files(limit=2)
    assert [r["id"] for r in page] == ids[::-1][:2] and more
    page, more = store.list_files(after=page[-1]["id"], limit=2)
    assert [r["id"] for r in page] == [ids[2], ids[1]] and more
    page, more = store.list_files(after=page[-1]["id"], limit=2)
    assert [r["id"] for r in page] == [ids[0]] and not more
    page, more = store.list_files(order="asc", limit=3)
    assert [r["id"] for r in page] == ids[:3] and more
    assert [r["id"] for r in store.list_files(purpose="batch")[0]] == [ids[4], ids[2], ids[0]]
    # a deleted file leaves the list, and its id still works as a cursor
    assert store.delete_file(ids[3]) and not store.delete_file(ids[3])
    assert store.get_file(ids[3]) is None
    assert [r["id"] for r in store.list_files(after=ids[3])[0]] == ids[2::-1]
    with pytest.raises(InvalidRequestError) as e:
        store.list_files(after="file-nope")
    assert e.value.param == "after"


def test_job_created_validating_with_an_event(store, tmp_path):
    job = make_job(store, tmp_path, metadata={"team": "a"})
    assert job["status"] == "validating_files" and job["id"].startswith("ftjob-")
    assert job["metadata"] == {"team": "a"} and job["hyperparameters"] == {"n_epochs": "auto"}
    assert job["out_dir"] == str(tmp_path / "ft" / job["id"])
    events, more = store.list_events(job["id"])
    assert [e["message"] for e in events] == [f"Created fine-tuning job: {job['id']}"] and not more


def test_field_updates_are_conditional_and_never_change_the_status(store, tmp_path):
    job = make_job(store, tmp_path)
    assert not store.update_job(job["id"], (Status.RUNNING,), estimated_finish=99, event="not running")
    assert store.update_job(job["id"], (Status.VALIDATING_FILES,), estimated_finish=99, event="validating")
    assert store.get_job(job["id"])["estimated_finish"] == 99
    assert [e["message"] for e in store.list_events(job["id"])[0]][0] == "validating"
    with pytest.raises(AssertionError, match="lifecycle"):
        store.update_job(job["id"], None, status=Status.SUCCEEDED)
    assert store.get_job(job["id"])["status"] == Status.VALIDATING_FILES


def test_jobs_newest_first_paged_and_filtered_by_metadata(store, tmp_path):
    ids = [make_job(store, tmp_path, metadata={"run": str(i % 2), "k\"q": "v"} if i else None)["id"] for i in range(5)]
    page, more = store.list_jobs(limit=3)
    assert [j["id"] for j in page] == ids[::-1][:3] and more
    page, more = store.list_jobs(after=page[-1]["id"], limit=3)
    assert [j["id"] for j in page] == [ids[1], ids[0]] and not more
    assert [j["id"] for j in store.list_jobs(metadata={"run": "1"})[0]] == [ids[3], ids[1]]
    assert [j["id"] for j in store.list_jobs(metadata={"run": "0", "k\"q": "v"})[0]] == [ids[4], ids[2]]
    assert [j["id"] for j in store.list_jobs(null_metadata=True)[0]] == [ids[0]]


def test_events_newest_first_and_metrics_one_per_step(store, tmp_path):
    jid = make_job(store, tmp_path)["id"]
    for step, loss in [(1, 3.0), (2, 2.0), (3, 1.5), (2, 2.5), (3, 1.25)]:  # steps 2-3 redone after a resume
        store.add_event(jid, f"Step {step}", type="metrics", data={"step": step, "train_loss": loss})
    page, more = store.list_events(jid, limit=2)
    assert [e["message"] for e in page] == ["Step 3", "Step 2"] and more
    assert page[0]["data"] == {"step": 3, "train_loss": 1.25} and page[0]["type"] == "metrics"
    rest, more = store.list_events(jid, after=page[-1]["id"], limit=10)
    assert [e["message"] for e in rest] == ["Step 3", "Step 2", "Step 1", f"Created fine-tuning job: {jid}"] and not more
    assert [(m["step"], m["train_loss"]) for m in store.metrics(jid)] == [(1, 3.0), (2, 2.5), (3, 1.25)]


def test_fine_tuned_models_and_their_deletion(store, tmp_path):
    job = make_job(store, tmp_path)
    adapter = tmp_path / "ft" / job["id"] / "adapter"
    store.add_checkpoint(job["id"], 5, {"step": 5, "train_loss": 1.0}, "ft:m:fundament::x:ckpt-step-5", adapter.parent / "checkpoints" / "step-5")
    assert [m["id"] for m in store.fine_tuned_models()] == ["ft:m:fundament::x:ckpt-step-5"]  # the job has not succeeded
    assert lifecycle.queue(store, job["id"], {"n_epochs": 1}, "valid") and lifecycle.claim(store, "w", 1, stale_s=30)
    assert lifecycle.succeed(store, job["id"], "ft:m:fundament::x", str(adapter), 100, [])
    assert store.update_job(job["id"], None, finished_at=123)
    models = store.fine_tuned_models()
    assert [(m["id"], m["kind"], m["base_model"]) for m in models] == [("ft:m:fundament::x", "model", "m"), ("ft:m:fundament::x:ckpt-step-5", "checkpoint", "m")]
    assert store.fine_tuned_model("ft:m:fundament::x")["created"] == 123
    ckpts, more = store.list_checkpoints(job["id"])
    assert [(c["step_number"], c["metrics"]["train_loss"], c["id"][:7]) for c in ckpts] == [(5, 1.0, "ftckpt_")] and not more
    assert store.delete_fine_tuned_model("ft:m:fundament::x")["kind"] == "model"
    assert store.fine_tuned_models() == [] and store.list_checkpoints(job["id"])[0] == []
    assert store.delete_fine_tuned_model("ft:m:fundament::x") is None

