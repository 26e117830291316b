"""Creating fine-tuning jobs against a real server on 127.0.0.1 with a tiny model and no worker:
numbers outside their ranges, Infinity and NaN sent as raw JSON literals included, are a 400 that
names the field, and nothing is created; a created job holds its own copy of its files, so they
can be deleted at once. (Training itself: tests/test_jobs_worker.py, tests/test_fine_tuning.py.)"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from conftest import ServerProcess
from tuning_data import sst2_chat, tiny_chat_llama


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    tiny = tiny_chat_llama(tmp_path_factory.getbasetemp())
    home = tmp_path_factory.mktemp("create-home")
    srv = ServerProcess(["--no-default-models", "--model", str(tiny), "--no-worker"], home)
    srv.home = home
    srv.model = httpx.get(f"{srv.base_url}/models").json()["data"][0]["id"]
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def c(tiny_server):
    return openai.OpenAI(base_url=tiny_server.base_url, api_key="x", max_retries=0, timeout=30)


def upload(c, records) -> str:
    return c.files.create(
        file=("train.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode()), purpose="fine-tune"
    ).id


def post_raw(srv, body: str) -> httpx.Response:
    """The body as written: `Infinity` and `NaN` are not JSON, but Python's parser reads them."""
    return httpx.post(f"{srv.base_url}/fine_tuning/jobs", content=body, headers={"content-type": "application/json"})


def jobs(c) -> list[str]:
    return [j.id for j in c.fine_tuning.jobs.list()]


# (where the field goes, its name) -> the param a 400 names
FIELDS = [
    (
        '"method": {"type": "supervised", "supervised": {"hyperparameters": {"learning_rate_multiplier": %s}}}',
        "method.supervised.hyperparameters.learning_rate_multiplier",
    ),
    ('"hyperparameters": {"learning_rate_multiplier": %s}', "hyperparameters.learning_rate_multiplier"),
    ('"hyperparameters": {"n_epochs": %s}', "hyperparameters.n_epochs"),
    ('"hyperparameters": {"batch_size": %s}', "hyperparameters.batch_size"),
    ('"lora_alpha": %s', "lora_alpha"),
    ('"weight_decay": %s', "weight_decay"),
    ('"lora_dropout": %s', "lora_dropout"),
    ('"warmup_ratio": %s', "warmup_ratio"),
    ('"lora_r": %s', "lora_r"),
    ('"eval_every": %s', "eval_every"),
    ('"row_tokens": %s', "row_tokens"),
]


@pytest.mark.parametrize("value", ["Infinity", "-Infinity", "NaN", "1e308", "-1e308", "1" + "0" * 400])
def test_non_finite_and_absurd_numbers_are_400_naming_the_field(c, tiny_server, value):
    train = upload(c, sst2_chat(12))
    before = jobs(c)
    for field, param in FIELDS:
        r = post_raw(tiny_server, f'{{"model": "{tiny_server.model}", "training_file": "{train}", {field % value}}}')
        assert r.status_code == 400, (field % value, r.text)
        err = r.json()["error"]
        assert (err["type"], err["param"]) == ("invalid_request_error", param), (field % value, err)
        assert param.rsplit(".", 1)[-1] in err["message"] and len(err["message"]) < 300, err["message"]
    assert jobs(c) == before  # nothing was created
    assert not (tiny_server.home / "fine_tuning").exists() or not any((tiny_server.home / "fine_tuning").iterdir())


def test_the_range_messages_say_what_to_send(c, tiny_server):
    train = upload(c, sst2_chat(12))
    for ext, message in [
        ({"lora_alpha": 1e308}, "Invalid value for 'lora_alpha': Input should be less than or equal to 1024"),
        ({"weight_decay": 2}, "Invalid value for 'weight_decay': Input should be less than or equal to 1"),
        ({"lora_dropout": -0.1}, "Invalid value for 'lora_dropout': Input should be greater than or equal to 0"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            c.fine_tuning.jobs.create(model=tiny_server.model, training_file=train, extra_body=ext)
        assert e.value.body["message"].startswith(message), e.value.body
    r = post_raw(tiny_server, f'{{"model": "{tiny_server.model}", "training_file": "{train}", "lora_alpha": Infinity}}')
    assert r.json()["error"]["message"].startswith("Invalid value for 'lora_alpha': Input should be a finite number")
    r = post_raw(
        tiny_server,
        f'{{"model": "{tiny_server.model}", "training_file": "{train}", "hyperparameters": {{"learning_rate_multiplier": NaN}}}}',
    )
    assert (
        r.json()["error"]["message"]
        == "hyperparameters.learning_rate_multiplier must be a finite number between 0.001 and 50, got nan."
    )
    # the extremes of each range are accepted
    job = c.fine_tuning.jobs.create(
        model=tiny_server.model,
        training_file=train,
        hyperparameters={"learning_rate_multiplier": 50, "n_epochs": 50},
        extra_body={"lora_alpha": 1024, "weight_decay": 1, "lora_dropout": 0.99, "warmup_ratio": 0, "lora_r": 256},
    )
    assert job.status == "validating_files" and job.hyperparameters.learning_rate_multiplier == 50


def test_a_job_holds_its_own_copy_so_its_files_can_be_deleted_at_once(c, tiny_server):
    records = sst2_chat(12)
    train, valid = upload(c, records), upload(c, sst2_chat(2, start=50))
    job = c.fine_tuning.jobs.create(model=tiny_server.model, training_file=train, validation_file=valid)
    data = tiny_server.home / "fine_tuning" / job.id / "data"
    assert (data / "training_file.jsonl").read_bytes() == c.files.content(train).content
    assert (data / "validation_file.jsonl").read_bytes() == c.files.content(valid).content
    assert c.files.delete(train).deleted and c.files.delete(valid).deleted  # as on OpenAI: allowed
    assert not (tiny_server.home / "files" / train).exists()
    assert (data / "training_file.jsonl").read_text().splitlines() == [json.dumps(r) for r in records]
    assert c.fine_tuning.jobs.retrieve(job.id).training_file == train
    # once the job has ended its copy goes
    assert c.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    assert not (tiny_server.home / "fine_tuning" / job.id).exists()
    # a file already deleted cannot start a job
    with pytest.raises(openai.BadRequestError) as e:
        c.fine_tuning.jobs.create(model=tiny_server.model, training_file=train)
    assert e.value.body["param"] == "training_file"
