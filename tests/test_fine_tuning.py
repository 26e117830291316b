"""Fine-tuning end to end through the official `openai` client, against a real `fundament serve`
(and the worker it starts) on the real default model: upload, create, follow the events to
success, the ft: model served at once and answering unlike its base; pagination; bad input as
4xx with `param`; bad data with line numbers; cancel; pause and resume; deleting models and files;
`fundament tune` and `fundament jobs`. SST-2 sentences, 12 examples, one epoch, so CI stays short."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import REPO, ServerProcess
from tuning_data import sst2_chat, write_jsonl

pytestmark = pytest.mark.slow

BASE = "smollm2-135m-instruct"
FINISHED = ("succeeded", "failed", "cancelled")


def jsonl(records) -> bytes:
    import json

    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records).encode()


@pytest.fixture(scope="module")
def ft_server(server, tmp_path_factory):
    srv = ServerProcess([], tmp_path_factory.mktemp("ft-home"))
    srv.home = Path(srv.log).parent
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def c(ft_server):
    return openai.OpenAI(base_url=ft_server.base_url, api_key="sk-test", max_retries=0, timeout=120)


def wait(c, job_id, statuses=FINISHED, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = c.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {job.status} after {timeout}s")


def wait_event(c, job_id, pred, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        for e in c.fine_tuning.jobs.list_events(job_id, limit=100).data:
            if pred(e):
                return e
        time.sleep(0.3)
    raise AssertionError(f"no such event for {job_id} in {timeout}s")


def metrics_steps(c, job_id) -> list[int]:
    return [
        e.data["step"] for e in reversed(list(c.fine_tuning.jobs.list_events(job_id, limit=100))) if e.type == "metrics"
    ]


def reply(c, model, text) -> str:
    msgs = [{"role": "user", "content": f"Determine the sentiment of this review: '{text}'"}]
    return (
        c.chat.completions.create(model=model, messages=msgs, max_completion_tokens=16, temperature=0)
        .choices[0]
        .message.content
    )


def upload(c, records, name="train.jsonl", purpose="fine-tune") -> str:
    return c.files.create(file=(name, jsonl(records)), purpose=purpose).id


@pytest.fixture(scope="module")
def trained(c):
    """One job trained to success: 12 SST-2 examples, 4 for validation, one epoch."""
    train, valid = upload(c, sst2_chat(12)), upload(c, sst2_chat(4, start=100), "valid.jsonl")
    job = c.fine_tuning.jobs.create(
        model=BASE,
        training_file=train,
        validation_file=valid,
        suffix="sst2",
        seed=42,
        metadata={"test": "e2e"},
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}},
    )
    statuses = [job.status]
    deadline = time.time() + 600
    while job.status not in FINISHED and time.time() < deadline:
        time.sleep(0.3)
        job = c.fine_tuning.jobs.retrieve(job.id)
        if job.status != statuses[-1]:
            statuses.append(job.status)
    return job, statuses, train, valid


def test_fine_tune_job_to_success(c, trained):
    job, statuses, train, valid = trained
    assert job.status == "succeeded", job.error
    assert statuses[0] == "validating_files" and statuses[-1] == "succeeded" and "running" in statuses
    assert job.object == "fine_tuning.job" and job.id.startswith("ftjob-")
    assert job.fine_tuned_model == f"ft:{BASE}:fundament:sst2:{job.id.removeprefix('ftjob-')}"
    assert (job.model, job.training_file, job.validation_file, job.seed, job.metadata) == (
        BASE,
        train,
        valid,
        42,
        {"test": "e2e"},
    )
    # auto hyperparameters resolved as documented: batch 0.2% of 12 -> 1, multiplier 1
    hp = job.hyperparameters
    assert (hp.n_epochs, hp.batch_size, hp.learning_rate_multiplier) == (1, 1, 1.0)
    assert job.method.type == "supervised" and job.method.supervised.hyperparameters.model_dump() == hp.model_dump()
    assert job.trained_tokens > 12 * 30 and job.finished_at >= job.created_at and job.estimated_finish is None
    assert job.error is None and job.organization_id == "org-fundament"


def test_events_metrics_result_file_and_checkpoints(c, trained):
    job = trained[0]
    events = list(c.fine_tuning.jobs.list_events(job.id, limit=7))  # the client pages through `after`
    assert events[0].message == "The job has successfully completed"  # newest first
    assert events[1].message == f"New fine-tuned model created: {job.fine_tuned_model}"
    assert events[-1].message == f"Created fine-tuning job: {job.id}"
    assert len({e.id for e in events}) == len(events)
    metrics = [e for e in reversed(events) if e.type == "metrics"]
    assert [m.data["step"] for m in metrics] == list(range(1, 13))
    assert all(
        m.data["total_steps"] == 12 and m.data["train_loss"] > 0 and 0 <= m.data["train_mean_token_accuracy"] <= 1
        for m in metrics
    )
    assert metrics[-1].data["valid_loss"] > 0 and metrics[-1].data["valid_mean_token_accuracy"] is not None
    assert metrics[0].message.startswith("Step 1/12: training loss=")
    assert metrics[-1].data["train_loss"] < metrics[0].data["train_loss"]  # it learned something
    # the result file: a metrics CSV through the Files API
    [rid] = job.result_files
    f = c.files.retrieve(rid)
    assert (f.purpose, f.filename) == ("fine-tune-results", "step_metrics.csv")
    rows = list(csv.DictReader(io.StringIO(c.files.content(rid).text)))
    assert [int(r["step"]) for r in rows] == list(range(1, 13))
    assert float(rows[0]["train_loss"]) == pytest.approx(metrics[0].data["train_loss"])
    # one checkpoint per epoch, its model id usable at once
    [ck] = c.fine_tuning.jobs.checkpoints.list(job.id).data
    assert ck.id.startswith("ftckpt_") and ck.object == "fine_tuning.job.checkpoint" and ck.fine_tuning_job_id == job.id
    assert (ck.step_number, ck.fine_tuned_model_checkpoint) == (12, f"{job.fine_tuned_model}:ckpt-step-12")
    assert ck.metrics.step == 12 and ck.metrics.train_loss == pytest.approx(metrics[-1].data["train_loss"])
    assert ck.metrics.full_valid_loss == pytest.approx(metrics[-1].data["valid_loss"])  # all 4 validation examples


def test_fine_tuned_model_is_served_at_once_and_answers_unlike_its_base(c, trained):
    job = trained[0]
    ids = {m.id for m in c.models.list()}
    assert {job.fine_tuned_model, f"{job.fine_tuned_model}:ckpt-step-12", BASE} <= ids
    assert c.models.retrieve(job.fine_tuned_model).id == job.fine_tuned_model
    reviews = [r["messages"][0]["content"].split("'")[1] for r in sst2_chat(4, split="dev")]
    base = [reply(c, BASE, t) for t in reviews]
    tuned = [reply(c, job.fine_tuned_model, t) for t in reviews]
    # the base model answers in sentences; trained on one-word answers, the ft: model answers in one word
    assert all(a not in ("positive", "negative") for a in base), base
    assert all(a in ("positive", "negative") for a in tuned), tuned
    assert reply(c, f"{job.fine_tuned_model}:ckpt-step-12", reviews[0]) in ("positive", "negative")
    done = c.completions.create(model=job.fine_tuned_model, prompt="The movie was", max_tokens=4, temperature=0)
    assert done.model == job.fine_tuned_model and done.choices[0].text
    # and classifications: a probability per label, from the fine-tuned weights
    prompts = [f"Determine the sentiment of this review: '{t}'" for t in reviews]
    probs = {}
    for m in (BASE, job.fine_tuned_model):
        r = httpx.post(
            f"{c.base_url}classifications",
            json={"model": m, "input": prompts, "labels": ["positive", "negative"], "answer_prefix": ""},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        probs[m] = [d["probabilities"]["positive"] for d in r.json()["data"]]
    assert max(abs(a - b) for a, b in zip(probs[BASE], probs[job.fine_tuned_model])) > 0.01


def test_a_compiled_job_trains_the_default_model_and_says_so(c, ft_server):
    """`compile: true` (our extension) on the real model through the official client: the job says
    why its first step waits, records that its layers were compiled, and its model is served."""
    import json

    train = upload(c, sst2_chat(10, start=40), "compiled.jsonl")
    job = c.fine_tuning.jobs.create(
        model=BASE,
        training_file=train,
        suffix="compiled",
        seed=3,
        extra_body={"compile": True},
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}},
    )
    job = wait(c, job.id)
    assert job.status == "succeeded", job.error
    messages = [e.message for e in c.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert any(m.startswith("Compiling the model's layers") for m in messages), messages
    saved = json.loads((ft_server.home / "fine_tuning" / job.id / "adapter" / "fundament_tune.json").read_text())
    assert saved["compiled"] is True and saved["config"]["compile"] is True
    assert metrics_steps(c, job.id)[-1] == 10
    assert reply(c, job.fine_tuned_model, "A fine film.")


def test_jobs_list_pages_and_filters_by_metadata(c, trained):
    few = upload(c, sst2_chat(3), "few.jsonl")  # fails validation at once: nothing trains
    made = [
        c.fine_tuning.jobs.create(model=BASE, training_file=few, metadata={"batch": "page", "i": str(i)}).id
        for i in range(3)
    ]
    page = c.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in page.data] == made[:0:-1] and page.has_more
    assert [j.id for j in c.fine_tuning.jobs.list(limit=2, metadata={"batch": "page"})] == made[::-1]
    assert [j.id for j in c.fine_tuning.jobs.list(metadata={"batch": "page", "i": "1"})] == [made[1]]
    everything = [j.id for j in c.fine_tuning.jobs.list(limit=1)]
    assert everything[:3] == made[::-1] and trained[0].id in everything and len(everything) == len(set(everything))
    failed = wait(c, made[0])
    assert failed.status == "failed" and failed.error.param == "training_file"
    assert failed.error.message == "The training file has 1 problem: the file has 3 examples; at least 10 are required."


def test_bad_training_data_fails_with_every_line_in_error_and_events(c):
    lines = sst2_chat(12)
    lines[1] = '{"messages": [{"role": "user", "content": "unclosed"}'
    lines[3] = {"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "positive"}]}
    lines[4] = {"messages": [{"role": "user", "content": "no answer"}]}
    lines[7] = {"messages": [{"role": "user", "content": "word " * 9000}, {"role": "assistant", "content": "positive"}]}
    job = c.fine_tuning.jobs.create(model=BASE, training_file=upload(c, lines, "bad.jsonl"))
    job = wait(c, job.id)
    assert job.status == "failed" and job.fine_tuned_model is None and job.trained_tokens is None
    assert (job.error.code, job.error.param) == ("invalid_training_file", "training_file")
    msg = job.error.message
    assert msg.startswith("The training file has 4 problems: line 2: not valid JSON")
    for needle in (
        'line 4: messages[0] has unknown role "narrator"',
        "line 5: no assistant message",
        "line 8: the example is",
        "context window of 8192",
    ):
        assert needle in msg, msg
    errors = [e.message for e in c.fine_tuning.jobs.list_events(job.id, limit=100) if e.level == "error"]
    assert sorted(m.split(":")[1].strip() for m in errors if m.startswith("training_file:")) == [
        "line 2",
        "line 4",
        "line 5",
        "line 8",
    ]


def test_bad_validation_file_fails_with_its_param(c):
    job = c.fine_tuning.jobs.create(
        model=BASE, training_file=upload(c, sst2_chat(12)), validation_file=upload(c, ["not json"], "v.jsonl")
    )
    job = wait(c, job.id)
    assert (job.status, job.error.code, job.error.param) == ("failed", "invalid_validation_file", "validation_file")
    assert (
        job.error.message == "The validation file has 1 problem: line 1: not valid JSON (Expecting value at column 1)."
    )


def bad_create(c, param, status=400, **kw):
    with pytest.raises(openai.APIStatusError) as e:
        c.fine_tuning.jobs.create(**{"model": BASE, **kw})
    assert e.value.status_code == status, e.value.response.text
    body = e.value.response.json()["error"]
    assert body["param"] == param and body["message"], body
    return body


def test_bad_create_requests_are_4xx_with_param(c):
    good = upload(c, sst2_chat(12))
    other = upload(c, sst2_chat(12), purpose="user_data")
    hp = lambda **h: {"type": "supervised", "supervised": {"hyperparameters": h}}  # noqa: E731
    assert "no file" in bad_create(c, "training_file", training_file="file-nope")["message"]
    assert "purpose 'user_data'" in bad_create(c, "training_file", training_file=other)["message"]
    bad_create(c, "validation_file", training_file=good, validation_file="file-nope")
    assert bad_create(c, "model", 404, training_file=good, model="no-such-model")["code"] == "model_not_found"
    assert "embedding model" in bad_create(c, "model", training_file=good, model="all-minilm-l6-v2")["message"]
    bad_create(c, "suffix", training_file=good, suffix="x" * 65)
    bad_create(c, "suffix", training_file=good, suffix="a:b")
    bad_create(c, "method.supervised.hyperparameters.n_epochs", training_file=good, method=hp(n_epochs=0))
    bad_create(c, "method.supervised.hyperparameters.n_epochs", training_file=good, method=hp(n_epochs=2.5))
    bad_create(c, "method.supervised.hyperparameters.batch_size", training_file=good, method=hp(batch_size="big"))
    bad_create(c, "method.supervised.hyperparameters.batch_size", training_file=good, method=hp(batch_size=True))
    bad_create(
        c, "method.supervised.hyperparameters.epochs", training_file=good, method=hp(epochs=3)
    )  # a typo is not "auto"
    bad_create(
        c,
        "method.supervised.hyperparameters.learning_rate_multiplier",
        training_file=good,
        method=hp(learning_rate_multiplier=-1),
    )
    bad_create(c, "hyperparameters.n_epochs", training_file=good, hyperparameters={"n_epochs": 0})
    bad_create(c, "hyperparameters", training_file=good, hyperparameters={"n_epochs": 1}, method=hp(n_epochs=1))
    bad_create(c, "method.type", training_file=good, method={"type": "dpo", "dpo": {}})
    bad_create(c, "metadata", training_file=good, metadata={f"k{i}": "v" for i in range(17)})
    bad_create(c, "seed", training_file=good, seed=-1)
    bad_create(c, "integrations", training_file=good, integrations=[{"type": "wandb", "wandb": {"project": "p"}}])
    r = httpx.post(f"{c.base_url}fine_tuning/jobs", json={"model": BASE})
    assert r.status_code == 400 and r.json()["error"]["param"] == "training_file"
    for ext, param in [
        ({"lora_r": 0}, "lora_r"),
        ({"target_modules": ["wte"]}, "target_modules"),
        ({"training_type": "full"}, "training_type"),
    ]:
        bad_create(c, param, training_file=good, extra_body=ext)


def test_bad_job_requests_are_4xx(c, trained):
    job = trained[0]
    for call in (
        lambda: c.fine_tuning.jobs.retrieve("ftjob-nope"),
        lambda: c.fine_tuning.jobs.cancel("ftjob-nope"),
        lambda: c.fine_tuning.jobs.list_events("ftjob-nope"),
        lambda: c.fine_tuning.jobs.checkpoints.list("ftjob-nope"),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    for call, verb in (
        (c.fine_tuning.jobs.cancel, "cancel"),
        (c.fine_tuning.jobs.pause, "pause"),
        (c.fine_tuning.jobs.resume, "resume"),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            call(job.id)
        assert f"Cannot {verb} the job {job.id}: it is succeeded" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        c.fine_tuning.jobs.list(limit=0)
    assert e.value.body["param"] == "limit"
    with pytest.raises(openai.BadRequestError) as e:
        c.fine_tuning.jobs.list(after="ftjob-nope")
    assert e.value.body["param"] == "after"


def test_cancel_stops_a_running_job_within_10_seconds(c):
    job = c.fine_tuning.jobs.create(
        model=BASE,
        training_file=upload(c, sst2_chat(12)),
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 5}}},
    )
    wait_event(c, job.id, lambda e: e.type == "metrics")
    t0 = time.time()
    cancelled = c.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.fine_tuned_model is None
    stopped = wait_event(c, job.id, lambda e: e.message.startswith("Training stopped at step"), timeout=10)
    assert time.time() - t0 < 10 and stopped.message.endswith("the job was cancelled.")
    time.sleep(2)
    job = c.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "cancelled" and job.fine_tuned_model is None and job.result_files == []
    assert max(metrics_steps(c, job.id)) < 60


def test_pause_and_resume_continue_from_the_saved_step(c):
    job = c.fine_tuning.jobs.create(
        model=BASE,
        training_file=upload(c, sst2_chat(12)),
        suffix="paused",
        seed=5,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
    )
    wait_event(c, job.id, lambda e: e.type == "metrics" and e.data["step"] >= 3)
    # the server answers other requests while the job trains
    assert reply(c, BASE, "A fine film.")
    paused = c.fine_tuning.jobs.pause(job.id)
    assert paused.status == "paused"
    e = wait_event(c, job.id, lambda e: e.message.startswith("Training paused at step"), timeout=10)
    at = int(e.message.split("step ")[1].split(";")[0])
    time.sleep(3)
    assert c.fine_tuning.jobs.retrieve(job.id).status == "paused" and max(metrics_steps(c, job.id)) == at
    assert c.fine_tuning.jobs.resume(job.id).status == "queued"
    job = wait(c, job.id)
    assert job.status == "succeeded", job.error
    assert metrics_steps(c, job.id) == list(range(1, 25))  # nothing redone, nothing skipped
    assert any(
        e.message == f"Resumed from the state saved at step {at}."
        for e in c.fine_tuning.jobs.list_events(job.id, limit=100)
    )
    assert [ck.step_number for ck in c.fine_tuning.jobs.checkpoints.list(job.id)] == [24, 12]
    assert reply(c, job.fine_tuned_model, "A fine film.") in ("positive", "negative")


def test_delete_models_and_files(c, trained, ft_server):
    job = trained[0]
    out_dir = ft_server.home / "fine_tuning" / job.id
    assert (out_dir / "adapter" / "adapter_model.safetensors").exists()
    for name in (BASE, "gpt-4o-mini", "all-minilm-l6-v2"):
        with pytest.raises(openai.BadRequestError) as e:
            c.models.delete(name)
        assert e.value.body["param"] == "model" and "only fine-tuned models (ft:...) can be deleted" in e.value.message
    d = c.models.delete(job.fine_tuned_model)
    assert (d.id, d.object, d.deleted) == (job.fine_tuned_model, "model", True)
    ids = {m.id for m in c.models.list()}
    assert job.fine_tuned_model not in ids and f"{job.fine_tuned_model}:ckpt-step-12" not in ids
    assert not out_dir.exists()
    with pytest.raises(openai.NotFoundError) as e:
        reply(c, job.fine_tuned_model, "fine")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        c.models.delete(job.fine_tuned_model)
    assert c.fine_tuning.jobs.retrieve(job.id).fine_tuned_model == job.fine_tuned_model  # the job's record stays
    # the job's files can be deleted too; the bytes are gone
    d = c.files.delete(job.training_file)
    assert d.deleted and not (ft_server.home / "files" / job.training_file).exists()
    with pytest.raises(openai.NotFoundError):
        c.files.content(job.training_file)


def test_tune_and_jobs_commands(c, ft_server, tmp_path):
    data = write_jsonl(tmp_path / "sst2.jsonl", sst2_chat(12, start=200))
    env = {**os.environ, "OPENAI_BASE_URL": ft_server.base_url, "OPENAI_API_KEY": "sk-test", "COLUMNS": "120"}
    png = tmp_path / "loss.png"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fundament.cli",
            "tune",
            str(data),
            "--model",
            BASE,
            "--n-epochs",
            "1",
            "--suffix",
            "cli",
            "--plot",
            str(png),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr + r.stdout
    model = r.stdout.strip().splitlines()[-1]
    assert model.startswith(f"ft:{BASE}:fundament:cli:") and model in {m.id for m in c.models.list()}
    assert "Step 12/12" in r.stdout or "12/12" in r.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    job_id = "ftjob-" + model.rsplit(":", 1)[1]
    cli = lambda *a: subprocess.run(
        [sys.executable, "-m", "fundament.cli", "jobs", *a],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd=REPO,
    )  # noqa: E731
    assert job_id in cli("list").stdout
    assert '"status": "succeeded"' in cli("show", job_id).stdout
    assert "The job has successfully completed" in cli("events", job_id, "--limit", "100").stdout
    r = cli("cancel", job_id)
    assert r.returncode == 2 and "Cannot cancel" in r.stderr
