"""The JobStore on a real SQLite file: pagination, conditional state changes, claiming one job at a
time across processes, recovering jobs from dead workers, fine-tuned model records."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import time

import pytest

from fundament.errors import InvalidRequestError
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


def test_state_changes_are_conditional(store, tmp_path):
    job = make_job(store, tmp_path)
    assert store.update_job(job["id"], ("validating_files",), status="queued")
    assert store.update_job(job["id"], ("queued", "running"), status="cancelled", event="cancelled")
    # a worker finishing late cannot overwrite the cancel
    assert not store.update_job(job["id"], ("running",), status="succeeded", fine_tuned_model="ft:x")
    row = store.get_job(job["id"])
    assert row["status"] == "cancelled" and row["fine_tuned_model"] is None
    assert store.list_events(job["id"])[0][0]["message"] == "cancelled"


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


def test_claim_is_one_job_at_a_time(store, tmp_path):
    a, b = make_job(store, tmp_path), make_job(store, tmp_path)
    assert store.claim_job("w1", 1, stale_s=30) is None  # nothing queued yet
    for j in (a, b):
        store.update_job(j["id"], ("validating_files",), status="queued")
    got = store.claim_job("w1", 1, stale_s=30)
    assert got["id"] == a["id"] and got["status"] == "running" and got["worker"] == "w1"
    assert store.claim_job("w2", 2, stale_s=30) is None  # w1 is training and alive
    assert store.heartbeat(a["id"], "w1") and not store.heartbeat(a["id"], "w2")
    store.update_job(a["id"], ("running",), status="succeeded")
    assert store.claim_job("w2", 2, stale_s=30)["id"] == b["id"]


def _claim_in_process(path, out):
    got = JobStore(path).claim_job(f"proc-{multiprocessing.current_process().pid}", 0, stale_s=30)
    out.put(got["id"] if got else None)


def test_claim_across_processes_gives_the_job_to_exactly_one(store, tmp_path):
    for _ in range(3):
        store.update_job(make_job(store, tmp_path)["id"], ("validating_files",), status="queued")
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claim_in_process, args=(store.path, out)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join()
    assert len([r for r in results if r]) == 1  # one trains; the others see it busy
    assert len(store.jobs_with_status("running")) == 1 and len(store.jobs_with_status("queued")) == 2


def test_orphans_of_dead_or_silent_workers_are_queued_again(store, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    a, b, c = (make_job(store, tmp_path) for _ in range(3))
    for j, (worker, pid) in zip((a, b, c), [("h:dead", dead.pid), ("h:silent", 1), ("h:alive", 1)]):
        store.update_job(j["id"], None, status="running", worker=worker, worker_pid=pid, heartbeat_at=time.time())
    store.update_job(b["id"], None, heartbeat_at=time.time() - 100)
    back = store.requeue_orphans(stale_s=30, is_dead=lambda row: row["worker_pid"] == dead.pid)
    assert sorted(r["id"] for r in back) == sorted([a["id"], b["id"]])
    assert [store.get_job(j["id"])["status"] for j in (a, b, c)] == ["queued", "queued", "running"]
    assert "resumes from its last checkpoint" in store.list_events(a["id"])[0][0]["message"]


def test_fine_tuned_models_and_their_deletion(store, tmp_path):
    job = make_job(store, tmp_path)
    adapter = tmp_path / "ft" / job["id"] / "adapter"
    store.add_checkpoint(job["id"], 5, {"step": 5, "train_loss": 1.0}, "ft:m:fundament::x:ckpt-step-5", adapter.parent / "checkpoints" / "step-5")
    assert [m["id"] for m in store.fine_tuned_models()] == ["ft:m:fundament::x:ckpt-step-5"]  # the job has not succeeded
    store.update_job(job["id"], None, status="succeeded", fine_tuned_model="ft:m:fundament::x", adapter_dir=str(adapter), finished_at=123)
    models = store.fine_tuned_models()
    assert [(m["id"], m["kind"], m["base_model"]) for m in models] == [("ft:m:fundament::x", "model", "m"), ("ft:m:fundament::x:ckpt-step-5", "checkpoint", "m")]
    assert store.fine_tuned_model("ft:m:fundament::x")["created"] == 123
    ckpts, more = store.list_checkpoints(job["id"])
    assert [(c["step_number"], c["metrics"]["train_loss"], c["id"][:7]) for c in ckpts] == [(5, 1.0, "ftckpt_")] and not more
    assert store.delete_fine_tuned_model("ft:m:fundament::x")["kind"] == "model"
    assert store.fine_tuned_models() == [] and store.list_checkpoints(job["id"])[0] == []
    assert store.delete_fine_tuned_model("ft:m:fundament::x") is None
