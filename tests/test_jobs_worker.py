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

from fundament.adapt.tune import latest_checkpoint
from fundament.config import ModelSpec, ServeConfig
from fundament.jobs.files import FileStore
from fundament.jobs.store import JobStore
from fundament.jobs.worker import Worker, fine_tuned_model_id
from tuning_data import sst2_chat, tiny_chat_llama, write_jsonl


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

    return store.create_job(model="tiny", base_model="tiny", training_file=train, validation_file=valid, suffix=suffix, seed=7,
                            metadata=None, hyperparameters=hp or {"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": "auto"},
                            extensions=ext, out_root=fundament_home() / "fine_tuning")


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
    job = create(store, upload(files, sst2_chat(12)), upload(files, sst2_chat(4, start=100), "valid.jsonl"),
                 hp={"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": "auto"}, lora_r=4)
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
    assert [(c["step_number"], c["model_id"]) for c in ckpts] == [(6, row["fine_tuned_model"] + ":ckpt-step-6"), (3, row["fine_tuned_model"] + ":ckpt-step-3")]
    assert all((Path(c["path"]) / "adapter_model.safetensors").exists() and c["metrics"]["train_loss"] > 0 for c in ckpts)
    assert ckpts[0]["metrics"]["full_valid_loss"] > 0 and "full_valid_loss" not in ckpts[1]["metrics"]
    msgs = messages(store, job["id"])
    assert msgs[0] == f"Created fine-tuning job: {job['id']}"
    assert msgs[2].startswith("Files validated (12 training examples")
    assert msgs[3] == "Fine-tuning job started"
    assert msgs[4].startswith("Step 1/6: training loss=")
    assert msgs[-2:] == [f"New fine-tuned model created: {row['fine_tuned_model']}", "The job has successfully completed"]
    metrics = store.metrics(job["id"])
    assert set(metrics[0]) >= {"step", "total_steps", "train_loss", "train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy"}
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
    job = create(store, upload(files, sst2_chat(12)), upload(files, ['{"prompt": 1, "completion": "x"}'], "valid.jsonl"))
    Worker(cfg, store, files).run_once()
    err = store.get_job(job["id"])["error"]
    assert (err["code"], err["param"]) == ("invalid_validation_file", "validation_file")
    assert err["message"] == "The validation file has 1 problem: line 1: 'prompt' must be a string."


def run_in_thread(worker):
    t = threading.Thread(target=worker.run_once)
    t.start()
    return t


def long_job(store, files):
    return create(store, upload(files, sst2_chat(12)), hp={"n_epochs": 25, "batch_size": 1, "learning_rate_multiplier": "auto"})


def test_cancel_stops_training_within_seconds(env):
    store, files, cfg = env
    job = long_job(store, files)
    t = run_in_thread(Worker(cfg, store, files))
    wait_for(lambda: len(store.metrics(job["id"])) >= 3)
    assert store.update_job(job["id"], ("running",), status="cancelled")
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
    assert store.update_job(job["id"], ("running",), status="paused")
    t.join(timeout=10)
    assert not t.is_alive()
    paused_at = store.metrics(job["id"])[-1]["step"]
    assert messages(store, job["id"])[-1] == f"Training paused at step {paused_at}; its state is saved for resume."
    assert latest_checkpoint(Path(job["out_dir"])) is not None and store.get_job(job["id"])["status"] == "paused"
    assert not Worker(cfg, store, files).run_once()  # a paused job is not trained
    store.update_job(job["id"], ("paused",), status="queued")
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
    store, files, cfg = env
    train = upload(files, sst2_chat(12))
    job = create(store, train)
    files.delete(train)
    Worker(cfg, store, files).run_once()
    row = store.get_job(job["id"])
    assert row["status"] == "failed" and row["error"]["param"] == "training_file"
    assert "cannot be read" in row["error"]["message"]
