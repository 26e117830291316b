"""The job lifecycle on a real SQLite file: the table of transitions, every transition outside it
refused (the job and its events untouched), each transition one atomic conditional update (racing
claims or a cancel racing a success: exactly one wins), orphans of dead workers queued again."""

from __future__ import annotations

import multiprocessing
import sqlite3
import subprocess
import sys
import threading
import time
import typing

import pytest

from fundament.errors import InvalidRequestError
from fundament.jobs import lifecycle
from fundament.jobs.files import FileStore
from fundament.jobs.lifecycle import ACTIVE, ALLOWED, FINISHED, TRANSITIONS, Status
from fundament.jobs.store import JobStore

S = Status


@pytest.fixture
def store(tmp_path):
    return JobStore(tmp_path / "fundament.sqlite3")


def make_job(store, tmp_path):
    return store.create_job(
        model="m",
        base_model="m",
        training_file="file-1",
        validation_file=None,
        suffix=None,
        seed=3,
        metadata=None,
        hyperparameters={"n_epochs": "auto"},
        extensions={},
        out_root=tmp_path / "ft",
    )


def put(store, job_id, **cols):
    """Test setup only: write columns (the status included) straight into the row."""
    with sqlite3.connect(store.path) as c:
        c.execute(f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in cols)} WHERE id = ?", (*cols.values(), job_id))


def events(store, job_id):
    return [e["message"] for e in store.list_events(job_id, limit=100)[0]]


# Each verb as the server or the worker calls it, on one job; True if it happened.
CALLS = {
    "queue": lambda st, jid: lifecycle.queue(st, jid, {"n_epochs": 2}, "Files validated"),
    "claim": lambda st, jid: lifecycle.claim(st, "w", 1, stale_s=30) is not None,
    "requeue": lambda st, jid: lifecycle.requeue(st, jid, "The worker shut down"),
    "pause": lifecycle.pause,
    "resume": lifecycle.resume,
    "succeed": lambda st, jid: lifecycle.succeed(st, jid, "ft:m:fundament::x", "/nowhere", 10, ["file-r"]),
    "fail": lambda st, jid: lifecycle.fail(st, jid, "training_error", "it broke", None),
    "cancel": lifecycle.cancel,
}


def test_the_table_of_transitions():
    assert {s: set(t) for s, t in ALLOWED.items()} == {
        S.VALIDATING_FILES: {S.QUEUED, S.FAILED, S.CANCELLED},
        S.QUEUED: {S.RUNNING, S.PAUSED, S.CANCELLED},
        S.RUNNING: {S.QUEUED, S.PAUSED, S.SUCCEEDED, S.FAILED, S.CANCELLED},
        S.PAUSED: {S.QUEUED, S.CANCELLED},
        S.SUCCEEDED: set(),
        S.FAILED: set(),
        S.CANCELLED: set(),
    }
    assert set(ACTIVE) | set(FINISHED) == set(Status) and not set(ACTIVE) & set(FINISHED)
    assert set(CALLS) == set(TRANSITIONS)


def test_the_wire_type_names_every_status():
    # imported here, not at the top: the processes spawned to claim import this module
    from fundament.server.protocol_fine_tuning import FineTuningJob

    assert typing.get_args(FineTuningJob.model_fields["status"].annotation) == tuple(Status)


@pytest.mark.parametrize("verb", sorted(TRANSITIONS))
def test_every_transition_happens_from_its_sources_and_is_refused_from_any_other(store, tmp_path, verb):
    t = TRANSITIONS[verb]
    for status in Status:
        job = make_job(store, tmp_path)
        put(store, job["id"], status=status)
        before, evs = store.get_job(job["id"]), events(store, job["id"])
        happened = CALLS[verb](store, job["id"])
        after = store.get_job(job["id"])
        if status in t.sources:
            assert happened and after["status"] == t.target, (verb, status)
            assert len(events(store, job["id"])) > len(evs) or verb == "claim"
        else:
            assert not happened and after == before and events(store, job["id"]) == evs, (verb, status)
        put(store, job["id"], status=S.CANCELLED)  # out of the way of the next claim


def test_each_transition_sets_its_fields_and_events(store, tmp_path):
    jid = make_job(store, tmp_path)["id"]
    assert lifecycle.queue(store, jid, {"n_epochs": 2}, "Files validated (3 examples)")
    assert store.get_job(jid)["hyperparameters"] == {"n_epochs": 2}
    got = lifecycle.claim(store, "host:1:ab", 1, stale_s=30)
    assert (got["id"], got["status"], got["worker"], got["worker_pid"]) == (jid, "running", "host:1:ab", 1)
    assert lifecycle.pause(store, jid) and lifecycle.resume(store, jid)
    assert lifecycle.claim(store, "host:2:cd", 2, stale_s=30)["worker"] == "host:2:cd"
    assert lifecycle.requeue(store, jid, "The worker shut down at step 3")
    row = store.get_job(jid)
    assert row["status"] == "queued" and row["worker"] is None and row["worker_pid"] is None
    assert lifecycle.claim(store, "host:3:ef", 3, stale_s=30)
    assert lifecycle.succeed(store, jid, "ft:m:fundament::x", "/adapter", 42, ["file-r"])
    row = store.get_job(jid)
    assert (row["fine_tuned_model"], row["adapter_dir"], row["trained_tokens"], row["result_files"]) == (
        "ft:m:fundament::x",
        "/adapter",
        42,
        ["file-r"],
    )
    assert row["finished_at"] >= int(time.time()) - 5 and row["estimated_finish"] is None
    assert events(store, jid)[:7] == [
        "The job has successfully completed",
        "New fine-tuned model created: ft:m:fundament::x",
        "The worker shut down at step 3",
        "Fine-tuning job resumed; queued to continue from its saved state",
        "Fine-tuning job paused",
        "Files validated (3 examples)",
        f"Created fine-tuning job: {jid}",
    ]
    other = make_job(store, tmp_path)["id"]
    assert lifecycle.fail(store, other, "invalid_training_file", "line 3: no messages", "training_file")
    row = store.get_job(other)
    assert row["error"] == {"code": "invalid_training_file", "message": "line 3: no messages", "param": "training_file"}
    assert store.list_events(other)[0][0]["level"] == "error"


def test_a_job_that_ends_drops_its_copy_of_its_files_and_a_paused_one_keeps_it(store, tmp_path):
    jobs = [make_job(store, tmp_path) for _ in range(2)]
    for j in jobs:
        (tmp_path / "ft" / j["id"] / "data").mkdir(parents=True)
    assert lifecycle.queue(store, jobs[0]["id"], {}, "valid") and lifecycle.pause(store, jobs[0]["id"])
    assert (tmp_path / "ft" / jobs[0]["id"] / "data").exists()
    assert lifecycle.cancel(store, jobs[0]["id"]) and lifecycle.fail(store, jobs[1]["id"], "c", "m", None)
    assert not any((tmp_path / "ft" / j["id"]).exists() for j in jobs)


def test_the_server_refuses_a_transition_outside_the_table_with_a_400_naming_the_status(store, tmp_path):
    from fundament.server.serving_fine_tuning import FineTuningHandler

    handler = FineTuningHandler(None, FileStore(store, tmp_path / "files"), tmp_path / "ft")
    jid = make_job(store, tmp_path)["id"]
    put(store, jid, status=S.SUCCEEDED)
    for verb, sources in [
        ("cancel", "validating_files or queued or running or paused"),
        ("pause", "running or queued"),
        ("resume", "paused"),
    ]:
        with pytest.raises(InvalidRequestError) as e:
            getattr(handler, verb)(jid)
        assert e.value.message == f"Cannot {verb} the job {jid}: it is succeeded; only a job that is {sources} can be."
        assert e.value.param == "fine_tuning_job_id"
    assert store.get_job(jid)["status"] == "succeeded" and events(store, jid) == [f"Created fine-tuning job: {jid}"]
    live = make_job(store, tmp_path)["id"]
    assert handler.cancel(live).status == "cancelled" and events(store, live)[0] == "Fine-tuning job cancelled"


def test_claim_is_one_job_at_a_time(store, tmp_path):
    a, b = make_job(store, tmp_path), make_job(store, tmp_path)
    assert lifecycle.claim(store, "w1", 1, stale_s=30) is None  # nothing queued yet
    for j in (a, b):
        assert lifecycle.queue(store, j["id"], {}, "valid")
    got = lifecycle.claim(store, "w1", 1, stale_s=30)
    assert got["id"] == a["id"] and got["status"] == "running" and got["worker"] == "w1"
    assert lifecycle.claim(store, "w2", 2, stale_s=30) is None  # w1 is training and alive
    assert store.heartbeat(a["id"], "w1") and not store.heartbeat(a["id"], "w2")
    assert lifecycle.succeed(store, a["id"], "ft:x", "/a", 1, [])
    assert lifecycle.claim(store, "w2", 2, stale_s=30)["id"] == b["id"]


def _claim_in_process(path, stale_s, start, out):
    store = JobStore(path)
    start.wait()
    got = lifecycle.claim(store, f"proc-{multiprocessing.current_process().pid}", 0, stale_s=stale_s)
    out.put(got["id"] if got else None)


def claim_in_processes(path, n: int, stale_s: float) -> list:
    ctx = multiprocessing.get_context("spawn")
    out, start = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_claim_in_process, args=(path, stale_s, start, out)) for _ in range(n)]
    for p in procs:
        p.start()
    time.sleep(1.0)  # let every process import and open the store, then go at once
    start.set()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join()
    return results


def test_two_claims_of_one_queued_job_give_it_to_exactly_one(store, tmp_path):
    """A negative stale_s: no worker counts as alive, so only the status condition of the UPDATE
    keeps the second claim from taking the job the first one holds."""
    jid = make_job(store, tmp_path)["id"]
    assert lifecycle.queue(store, jid, {}, "valid")
    results = claim_in_processes(store.path, 2, stale_s=-1e9)
    assert sorted(results, key=str) == sorted([jid, None], key=str)
    assert store.get_job(jid)["status"] == "running"


def test_claim_across_processes_gives_one_job_while_a_worker_is_alive(store, tmp_path):
    for _ in range(3):
        assert lifecycle.queue(store, make_job(store, tmp_path)["id"], {}, "valid")
    results = claim_in_processes(store.path, 4, stale_s=30)
    assert len([r for r in results if r]) == 1  # one trains; the others see it busy
    assert len(store.jobs_with_status(S.RUNNING)) == 1 and len(store.jobs_with_status(S.QUEUED)) == 2


def test_a_cancel_racing_a_success_or_a_failure_leaves_exactly_one_winner(store, tmp_path):
    for rival in ("succeed", "fail", "pause"):
        for _ in range(10):
            jid = make_job(store, tmp_path)["id"]
            put(store, jid, status=S.RUNNING)
            go, won = threading.Barrier(2), {}

            def run(verb, jid=jid, go=go, won=won):
                go.wait()
                won[verb] = CALLS[verb](store, jid)

            threads = [threading.Thread(target=run, args=(v,)) for v in ("cancel", rival)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if rival == "pause":  # pause then cancel is allowed: both may win, cancel is last
                assert won["cancel"] and store.get_job(jid)["status"] == "cancelled"
                continue
            assert won["cancel"] != won[rival], won
            row = store.get_job(jid)
            assert row["status"] == ("cancelled" if won["cancel"] else TRANSITIONS[rival].target)
            assert (row["fine_tuned_model"] is not None) == (rival == "succeed" and won[rival])


def test_orphans_of_dead_or_silent_workers_are_queued_again(store, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    a, b, c = (make_job(store, tmp_path) for _ in range(3))
    for j, (worker, pid) in zip((a, b, c), [("h:dead", dead.pid), ("h:silent", 1), ("h:alive", 1)]):
        put(store, j["id"], status=S.RUNNING, worker=worker, worker_pid=pid, heartbeat_at=time.time())
    put(store, b["id"], heartbeat_at=time.time() - 100)
    back = lifecycle.requeue_orphans(store, stale_s=30, is_dead=lambda row: row["worker_pid"] == dead.pid)
    assert sorted(r["id"] for r in back) == sorted([a["id"], b["id"]])
    assert [store.get_job(j["id"])["status"] for j in (a, b, c)] == ["queued", "queued", "running"]
    assert "resumes from its last checkpoint" in store.list_events(a["id"])[0][0]["message"]


def test_an_orphan_whose_worker_beats_meanwhile_is_left_running(store, tmp_path):
    jid = make_job(store, tmp_path)["id"]
    put(store, jid, status=S.RUNNING, worker="h:w", worker_pid=1, heartbeat_at=time.time())

    def beats_while_checked(row):  # its pid looks gone, but a heartbeat lands between the read and the update
        time.sleep(0.01)
        assert store.heartbeat(row["id"], row["worker"])
        return True

    assert lifecycle.requeue_orphans(store, stale_s=30, is_dead=beats_while_checked) == []
    assert store.get_job(jid)["status"] == "running"
