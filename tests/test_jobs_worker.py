"""The worker's state machine in-process, on a tiny Llama with SmolLM2's tokenizer and a real
SQLite file: validate -> queue -> train -> succeed with its files and events; failures with line
numbers; cancel, pause/resume and shutdown between steps. (The real model, through a real server,
is tests/test_fine_tuning.py.)"""

from __future__ import annotations

import csv
import io
import threading
import time
from pathlib import Path

import pytest
from tuning_data import sst2_chat, tiny_chat_llama, write_jsonl

from fundament.adapt.tune import latest_checkpoint
from fundament.config import ModelSpec, ServeConfig
from fundament.jobs import lifecycle
from fundament.jobs.files import FileStore
from fundament.jobs.job_data import keep_job_files
from fundament.jobs.naming import fine_tuned_model_id
from fundament.jobs.store import JobStore
from fundament.jobs.worker import Worker


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import torch

    # One thread: a tiny model gains nothing from more, and OpenMP threads spinning against other
    # processes on a shared 2-core machine make each step many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_chat_llama(tmp_path_factory.getbasetemp())
    torch.set_num_threads(threads)


@pytest.fixture
def env(tiny, tmp_path):
    store = JobStore()
    files = FileStore(store)
    cfg = ServeConfig(models=[ModelSpec(name="tiny", path=str(tiny))], aliases={})
    return store, files, cfg


def upload(files, records, name="train.jsonl"):
    data = write_jsonl(Path(files.dir.parent) / name, records).read_bytes()
    return files.add_bytes(data, name, "fine-tune")["id"]


def create(store, train, valid=None, hp=None, suffix="t", **ext):
    from fundament.config import fundament_home

    return store.create_job(
        model="tiny",
        base_model="tiny",
        training_file=train,
        validation_file=valid,
        suffix=suffix,
        seed=7,
        metadata=None,
        hyperparameters=hp or {"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": "auto"},
        extensions=ext,
        out_root=fundament_home() / "fine_tuning",
    )


def messages(store, job_id):
    return [e["message"] for e in reversed(store.list_events(job_id, limit=1000)[0])]


def wait_for(cond, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_job_succeeds_with_model_result_file_checkpoints_and_events(env):
    store, files, cfg = env
    job = create(
        store,
        upload(files, sst2_chat(12)),
        upload(files, sst2_chat(4, start=100), "valid.jsonl"),
        hp={"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": "auto"},
        lora_r=4,
    )
    assert Worker(cfg, store, files).run_once()
    row = store.get_job(job["id"])
    assert row["status"] == "succeeded", row["error"]
    assert row["fine_tuned_model"] == fine_tuned_model_id(row) == f"ft:tiny:fundament:t:{job['id'][6:]}"
    assert row["hyperparameters"] == {"batch_size": 4, "learning_rate_multiplier": 1.0, "n_epochs": 2}
    assert row["trained_tokens"] > 2 * 12 * 20 and row["finished_at"] and row["estimated_finish"] is None
    adapter = Path(row["adapter_dir"])
    assert adapter == Path(row["out_dir"]) / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    # result file: one CSV row per step (2 epochs x 3 steps), validation loss where evaluated
    [result] = row["result_files"]
    assert files.store.get_file(result)["purpose"] == "fine-tune-results"
    table = list(csv.DictReader(io.StringIO(files.read(result).decode())))
    assert [int(r["step"]) for r in table] == [1, 2, 3, 4, 5, 6]
    assert all(float(r["train_loss"]) > 0 for r in table) and table[-1]["valid_loss"] != ""
    # one checkpoint per epoch, each a servable PEFT directory with its own model id
    ckpts = store.list_checkpoints(job["id"])[0]
    assert [(c["step_number"], c["model_id"]) for c in ckpts] == [
        (6, row["fine_tuned_model"] + ":ckpt-step-6"),
        (3, row["fine_tuned_model"] + ":ckpt-step-3"),
    ]
    assert all(
        (Path(c["path"]) / "adapter_model.safetensors").exists() and c["metrics"]["train_loss"] > 0 for c in ckpts
    )
    assert ckpts[0]["metrics"]["full_valid_loss"] > 0 and "full_valid_loss" not in ckpts[1]["metrics"]
    msgs = messages(store, job["id"])
    assert msgs[0] == f"Created fine-tuning job: {job['id']}"
    assert msgs[2].startswith("Files validated (12 training examples")
    assert msgs[3] == "Fine-tuning job started"
    assert msgs[4].startswith("Step 1/6: training loss=")
    assert msgs[-2:] == [
        f"New fine-tuned model created: {row['fine_tuned_model']}",
        "The job has successfully completed",
    ]
    metrics = store.metrics(job["id"])
    assert set(metrics[0]) >= {
        "step",
        "total_steps",
        "train_loss",
        "train_mean_token_accuracy",
        "valid_loss",
        "valid_mean_token_accuracy",
    }
    assert metrics[-1]["total_steps"] == 6 and metrics[-1]["valid_loss"] is not None


def test_bad_data_fails_the_job_with_lines_in_error_and_events(env):
    store, files, cfg = env
    lines = sst2_chat(12)
    lines[2] = {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}
    lines[6] = '{"messages": '
    job = create(store, upload(files, lines), upload(files, ['{"prompt": 1, "completion": "x"}'], "valid.jsonl"))
    Worker(cfg, store, files).run_once()
    row = store.get_job(job["id"])
    assert row["status"] == "failed" and row["fine_tuned_model"] is None
    assert row["error"]["code"] == "invalid_training_file" and row["error"]["param"] == "training_file"
    assert row["error"]["message"].startswith("The training file has 2 problems: line 3: ")
    assert "line 7: not valid JSON" in row["error"]["message"]
    errors = [e for e in store.list_events(job["id"], limit=100)[0] if e["level"] == "error"]
    assert [e["message"][:21] for e in reversed(errors)][:2] == ["training_file: line 3", "training_file: line 7"]
    assert not Path(row["out_dir"]).exists()  # nothing trained on bad data

    # a bad validation file fails with param validation_file
    job = create(
        store, upload(files, sst2_chat(12)), upload(files, ['{"prompt": 1, "completion": "x"}'], "valid.jsonl")
    )
    Worker(cfg, store, files).run_once()
    err = store.get_job(job["id"])["error"]
    assert (err["code"], err["param"]) == ("invalid_validation_file", "validation_file")
    assert err["message"] == "The validation file has 1 problem: line 1: 'prompt' must be a string."


def run_in_thread(worker):
    t = threading.Thread(target=worker.run_once)
    t.start()
    return t


def long_job(store, files):
    return create(
        store, upload(files, sst2_chat(12)), hp={"n_epochs": 25, "batch_size": 1, "learning_rate_multiplier": "auto"}
    )


def test_cancel_stops_training_within_seconds(env):
    store, files, cfg = env
    job = long_job(store, files)
    t = run_in_thread(Worker(cfg, store, files))
    wait_for(lambda: len(store.metrics(job["id"])) >= 3)
    assert lifecycle.cancel(store, job["id"])
    t0 = time.time()
    t.join(timeout=10)
    assert not t.is_alive() and time.time() - t0 < 10
    row = store.get_job(job["id"])
    assert row["status"] == "cancelled" and row["fine_tuned_model"] is None and row["result_files"] == []
    last = messages(store, job["id"])[-1]
    assert last.startswith("Training stopped at step ") and last.endswith("the job was cancelled.")
    assert len(store.metrics(job["id"])) < 300


def test_pause_saves_state_and_resume_continues_from_it(env):
    store, files, cfg = env
    job = long_job(store, files)
    t = run_in_thread(Worker(cfg, store, files))
    wait_for(lambda: len(store.metrics(job["id"])) >= 5)
    assert lifecycle.pause(store, job["id"])
    t.join(timeout=10)
    assert not t.is_alive()
    paused_at = store.metrics(job["id"])[-1]["step"]
    assert messages(store, job["id"])[-1] == f"Training paused at step {paused_at}; its state is saved for resume."
    assert latest_checkpoint(Path(job["out_dir"])) is not None and store.get_job(job["id"])["status"] == "paused"
    assert not Worker(cfg, store, files).run_once()  # a paused job is not trained
    assert lifecycle.resume(store, job["id"])
    Worker(cfg, store, files).run_once()
    row = store.get_job(job["id"])
    assert row["status"] == "succeeded"
    assert f"Resumed from the state saved at step {paused_at}." in messages(store, job["id"])
    steps = [e["data"]["step"] for e in reversed(store.list_events(job["id"], limit=1000)[0]) if e["type"] == "metrics"]
    assert steps == list(range(1, 301))  # no step trained twice, none skipped


def test_worker_shutdown_queues_the_job_and_the_next_worker_resumes_it(env):
    store, files, cfg = env
    job = long_job(store, files)
    first = Worker(cfg, store, files)
    t = run_in_thread(first)
    wait_for(lambda: len(store.metrics(job["id"])) >= 5)
    first.stopping.set()  # what SIGTERM does
    t.join(timeout=10)
    row = store.get_job(job["id"])
    assert row["status"] == "queued" and row["worker"] is None
    step = store.metrics(job["id"])[-1]["step"]
    assert messages(store, job["id"])[-1].startswith(f"The worker shut down at step {step}")
    Worker(cfg, store, files).run_once()
    assert store.get_job(job["id"])["status"] == "succeeded"
    assert f"Resumed from the state saved at step {step}." in messages(store, job["id"])


def test_deleted_training_file_fails_the_job(env):
    # A job with no copy of its own (created before jobs kept one) whose file went before validation.
    store, files, cfg = env
    train = upload(files, sst2_chat(12))
    job = create(store, train)
    files.delete(train)
    Worker(cfg, store, files).run_once()
    row = store.get_job(job["id"])
    assert row["status"] == "failed" and row["error"]["param"] == "training_file"
    assert "cannot be read" in row["error"]["message"]


# ---- a job's own copy of its files ----------------------------------------------------------------


def create_with_copies(store, files, train, valid=None, **kw):
    """As the server creates a job: with its own copy of its files (the server makes it first)."""
    job = create(store, train, valid, **kw)
    assert set(keep_job_files(files, job["out_dir"], job)) == {"training_file"} | (
        {"validation_file"} if valid else set()
    )
    return job


def test_deleting_the_files_after_create_leaves_the_job_whole(env):
    store, files, cfg = env
    train, valid = upload(files, sst2_chat(12)), upload(files, sst2_chat(4, start=100), "valid.jsonl")
    job = create_with_copies(store, files, train, valid)
    data = Path(job["out_dir"]) / "data"
    assert (data / "training_file.jsonl").read_bytes() == files.read(train)
    assert files.delete(train) and files.delete(valid)  # as DELETE /v1/files/{id} does
    Worker(cfg, store, files).run_once()
    row = store.get_job(job["id"])
    assert row["status"] == "succeeded", row["error"]
    assert store.metrics(job["id"])[-1]["valid_loss"] is not None  # the validation file was read too
    assert (
        not data.exists() and (Path(row["out_dir"]) / "adapter" / "adapter_model.safetensors").exists()
    )  # the copy went with the job's end


def test_a_job_resumed_after_its_file_was_deleted_finishes_every_step(env):
    store, files, cfg = env
    train = upload(files, sst2_chat(12))
    job = create_with_copies(
        store, files, train, hp={"n_epochs": 25, "batch_size": 1, "learning_rate_multiplier": "auto"}
    )
    first = Worker(cfg, store, files)
    t = run_in_thread(first)
    wait_for(lambda: len(store.metrics(job["id"])) >= 5)
    assert files.delete(train)
    first.stopping.set()  # the worker goes; the next one has nothing in memory and reads the job's copy
    t.join(timeout=10)
    step = store.metrics(job["id"])[-1]["step"]
    assert store.get_job(job["id"])["status"] == "queued" and not files.path(train).exists()
    Worker(cfg, store, files).run_once()
    row = store.get_job(job["id"])
    assert row["status"] == "succeeded", row["error"]
    assert f"Resumed from the state saved at step {step}." in messages(store, job["id"])
    assert [m["step"] for m in store.metrics(job["id"])] == list(range(1, 301))


def test_a_cancelled_or_failed_job_drops_its_copy_and_a_paused_one_keeps_it(env):
    store, files, cfg = env
    job = create_with_copies(
        store,
        files,
        upload(files, sst2_chat(12)),
        hp={"n_epochs": 25, "batch_size": 1, "learning_rate_multiplier": "auto"},
    )
    data = Path(job["out_dir"]) / "data"
    t = run_in_thread(Worker(cfg, store, files))
    wait_for(lambda: len(store.metrics(job["id"])) >= 3)
    assert lifecycle.pause(store, job["id"])
    t.join(timeout=10)
    assert (data / "training_file.jsonl").exists()  # a paused job resumes from it
    assert lifecycle.resume(store, job["id"])
    t = run_in_thread(Worker(cfg, store, files))
    wait_for(lambda: store.get_job(job["id"])["status"] == "running" and len(store.metrics(job["id"])) >= 6)
    assert lifecycle.cancel(store, job["id"])
    t.join(timeout=10)
    assert not data.exists() and Path(job["out_dir"]).exists()  # checkpoints stay; the copy goes
    few = create_with_copies(store, files, upload(files, sst2_chat(3)))
    Worker(cfg, store, files).run_once()
    assert store.get_job(few["id"])["status"] == "failed" and not Path(few["out_dir"]).exists()  # nothing left at all


# ---- runs that cannot train --------------------------------------------------------------------


def test_a_job_stored_with_an_absurd_value_fails_validation_naming_it(env):
    """A job created before the server checked ranges (or written by another tool) is refused by
    the worker, before it trains."""
    store, files, cfg = env
    job = create(store, upload(files, sst2_chat(12)), lora_alpha=1e308)
    Worker(cfg, store, files).run_once()
    row = store.get_job(job["id"])
    assert row["status"] == "failed" and row["error"]["param"] == "lora_alpha"
    assert row["error"]["message"] == "lora_alpha must be between 0.001 and 1024, got 1e+308."


def test_a_job_that_diverges_fails_at_its_step_and_serves_no_model(env, monkeypatch):
    from fundament.adapt.trainer import Trainer

    store, files, cfg = env
    row_loss = Trainer.row_loss
    calls = []

    def diverging(self, row):  # one row per step here; from the fifth step on the loss overflows
        calls.append(1)
        loss, n, right = row_loss(self, row)
        return (loss * float("inf") if len(calls) >= 5 else loss), n, right

    monkeypatch.setattr(Trainer, "row_loss", diverging)
    job = create_with_copies(
        store, files, upload(files, sst2_chat(12)), hp={"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 2}
    )
    Worker(cfg, store, files).run_once()
    row = store.get_job(job["id"])
    assert row["status"] == "failed" and row["fine_tuned_model"] is None and row["result_files"] == []
    assert row["error"] == {
        "code": "training_diverged",
        "param": None,
        "message": (
            "Training diverged at step 5: the training loss became non-finite (inf). Lower learning_rate_multiplier "
            "(it is 2, a learning rate of 0.0004) or lora_alpha (it is 32) and create the job again."
        ),
    }
    assert [m["step"] for m in store.metrics(job["id"])] == [1, 2, 3, 4]  # no step with a non-finite loss recorded
    assert all(m["train_loss"] > 0 for m in store.metrics(job["id"]))
    # the checkpoint of the first epoch (step 3) is on disk, but a failed job has no model
    assert (Path(row["out_dir"]) / "checkpoints" / "step-3").is_dir() and not (
        Path(row["out_dir"]) / "adapter"
    ).exists()
    assert store.fine_tuned_models() == [] and store.list_checkpoints(job["id"])[0] == []
    assert messages(store, job["id"])[-1] == "Fine-tuning job failed: " + row["error"]["message"]
