"""A job survives a crash: SIGKILL of the server and its worker mid-training, then a new server on
the same home queues the job again, the trainer resumes from its saved state, and the job
succeeds with no step skipped, no file or job record lost. Real default model, real processes."""

from __future__ import annotations

import os
import signal
import time

import openai
import pytest
from conftest import ServerProcess
from test_fine_tuning import BASE, jsonl, metrics_steps, reply, wait
from tuning_data import sst2_chat

from fundament.jobs.store import JobStore

pytestmark = pytest.mark.slow


def test_sigkill_mid_training_then_restart_resumes_and_succeeds(server, tmp_path_factory):
    home = tmp_path_factory.mktemp("crash-home")
    srv = ServerProcess([], home)
    try:
        c = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0, timeout=120)
        train = c.files.create(file=("train.jsonl", jsonl(sst2_chat(12))), purpose="fine-tune")
        job = c.fine_tuning.jobs.create(
            model=BASE,
            training_file=train.id,
            seed=1,
            suffix="crash",
            method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 5}}},
        )
        state = home / "fine_tuning" / job.id / "resume" / "state.pt"
        deadline = time.time() + 300
        while not state.exists():  # the trainer saves its state every 10 s of training
            assert time.time() < deadline and c.fine_tuning.jobs.retrieve(job.id).status != "succeeded", (
                "no saved state"
            )
            time.sleep(0.1)
        store = JobStore(home / "fundament.sqlite3")
        worker_pid = store.get_job(job.id)["worker_pid"]
        os.kill(srv.proc.pid, signal.SIGKILL)
        os.kill(worker_pid, signal.SIGKILL)
        srv.proc.wait()
    finally:
        srv.stop()
    before = metrics_steps_from_store(store, job.id)
    row = store.get_job(job.id)
    assert row["status"] == "running" and 0 < max(before) < 60  # killed mid-training, nobody told the store

    srv = ServerProcess([], home)
    try:
        c = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0, timeout=120)
        job = wait(c, job.id)
        assert job.status == "succeeded", job.error
        events = [e.message for e in reversed(list(c.fine_tuning.jobs.list_events(job.id, limit=100)))]
        lost = events.index(
            "The worker training this job stopped unexpectedly; the job is queued again and resumes from its last checkpoint."
        )
        resumed = next(m for m in events[lost:] if m.startswith("Resumed from the state saved at step "))
        at = int(resumed.removeprefix("Resumed from the state saved at step ").rstrip("."))
        assert 1 <= at <= max(before)
        steps = metrics_steps(c, job.id)
        # before the crash 1..k (k >= at); after it at+1..60: the steps after the saved state are redone, none skipped
        assert steps == list(range(1, max(before) + 1)) + list(range(at + 1, 61))
        assert [ck.step_number for ck in c.fine_tuning.jobs.checkpoints.list(job.id)][0] == 60
        assert c.files.content(train.id).content == jsonl(sst2_chat(12))  # no file lost
        assert job.fine_tuned_model in {m.id for m in c.models.list()}
        assert reply(c, job.fine_tuned_model, "An utterly charming film.") in ("positive", "negative")
    finally:
        srv.stop()


def metrics_steps_from_store(store, job_id):
    return [m["step"] for m in store.metrics(job_id)]


def test_training_file_deleted_mid_job_then_worker_sigkill_resumes_and_succeeds(server, tmp_path_factory):
    """The job's own copy of its data: DELETE /v1/files of its training file while it trains is
    allowed (as on OpenAI), and the worker that resumes it after a SIGKILL reads that copy."""
    home = tmp_path_factory.mktemp("delete-home")
    srv = ServerProcess([], home)
    try:
        c = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0, timeout=120)
        train = c.files.create(file=("train.jsonl", jsonl(sst2_chat(12, start=300))), purpose="fine-tune")
        job = c.fine_tuning.jobs.create(
            model=BASE,
            training_file=train.id,
            seed=2,
            suffix="deleted",
            method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 4}}},
        )
        state = home / "fine_tuning" / job.id / "resume" / "state.pt"
        deadline = time.time() + 300
        while not state.exists():
            assert time.time() < deadline and c.fine_tuning.jobs.retrieve(job.id).status != "succeeded", (
                "no saved state"
            )
            time.sleep(0.1)
        deleted = c.files.delete(train.id)
        assert (deleted.id, deleted.deleted) == (train.id, True)
        assert not (home / "files" / train.id).exists()
        with pytest.raises(openai.NotFoundError):
            c.files.retrieve(train.id)
        store = JobStore(home / "fundament.sqlite3")
        old_worker = store.get_job(job.id)["worker_pid"]
        os.kill(old_worker, signal.SIGKILL)  # the server starts another worker, which finds the job orphaned
        before = max(metrics_steps_from_store(store, job.id))
        job = wait(c, job.id)
        assert job.status == "succeeded", job.error
        events = [e.message for e in reversed(list(c.fine_tuning.jobs.list_events(job.id, limit=200)))]
        lost = events.index(
            "The worker training this job stopped unexpectedly; the job is queued again and resumes from its last checkpoint."
        )
        resumed = next(m for m in events[lost:] if m.startswith("Resumed from the state saved at step "))
        at = int(resumed.removeprefix("Resumed from the state saved at step ").rstrip("."))
        assert 1 <= at <= before < 48
        steps = metrics_steps(c, job.id)
        assert steps == list(range(1, before + 1)) + list(
            range(at + 1, 49)
        )  # steps after the saved state redone, none skipped
        assert [ck.step_number for ck in c.fine_tuning.jobs.checkpoints.list(job.id)] == [48, 36, 24, 12]
        assert job.fine_tuned_model in {m.id for m in c.models.list()}
        assert reply(c, job.fine_tuned_model, "An utterly charming film.") in ("positive", "negative")
        assert not (home / "fine_tuning" / job.id / "data").exists()  # the job's copy went when it ended
        assert job.training_file == train.id  # the job still names the file it was created with
    finally:
        srv.stop()
