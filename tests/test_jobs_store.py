"""The JobStore on a real SQLite file: pagination, conditional field updates, fine-tuned model
records, and migrations that bring a database made by an older release up to date. (Status changes
are tests/test_jobs_lifecycle.py's.)"""

from __future__ import annotations

import multiprocessing
import sqlite3

import pytest

from fundament.errors import FundamentError, InvalidRequestError
from fundament.jobs import lifecycle
from fundament.jobs import store as store_module
from fundament.jobs.lifecycle import Status
from fundament.jobs.store import MIGRATIONS, JobStore


@pytest.fixture
def store(tmp_path):
    return JobStore(tmp_path / "fundament.sqlite3")


def make_job(store, tmp_path, **kw):
    args = dict(
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
    return store.create_job(**{**args, **kw})


def test_wal_mode_and_schema(store):
    import sqlite3

    c = sqlite3.connect(store.path)
    assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table'")} >= {
        "files",
        "jobs",
        "events",
        "checkpoints",
    }


def test_file_pages_in_both_orders_with_has_more(store):
    ids = [
        store.add_file(f"file-{i}", f"f{i}.jsonl", "fine-tune" if i % 2 else "batch", 10 + i)["id"] for i in range(5)
    ]
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
    assert store.list_events(job["id"])[0][0]["message"] == "validating"
    with pytest.raises(AssertionError, match="lifecycle"):
        store.update_job(job["id"], None, status=Status.SUCCEEDED)
    assert store.get_job(job["id"])["status"] == Status.VALIDATING_FILES


def test_jobs_newest_first_paged_and_filtered_by_metadata(store, tmp_path):
    ids = [make_job(store, tmp_path, metadata={"run": str(i % 2), 'k"q': "v"} if i else None)["id"] for i in range(5)]
    page, more = store.list_jobs(limit=3)
    assert [j["id"] for j in page] == ids[::-1][:3] and more
    page, more = store.list_jobs(after=page[-1]["id"], limit=3)
    assert [j["id"] for j in page] == [ids[1], ids[0]] and not more
    assert [j["id"] for j in store.list_jobs(metadata={"run": "1"})[0]] == [ids[3], ids[1]]
    assert [j["id"] for j in store.list_jobs(metadata={"run": "0", 'k"q': "v"})[0]] == [ids[4], ids[2]]
    assert [j["id"] for j in store.list_jobs(null_metadata=True)[0]] == [ids[0]]


def test_events_newest_first_and_metrics_one_per_step(store, tmp_path):
    jid = make_job(store, tmp_path)["id"]
    for step, loss in [(1, 3.0), (2, 2.0), (3, 1.5), (2, 2.5), (3, 1.25)]:  # steps 2-3 redone after a resume
        store.add_event(jid, f"Step {step}", type="metrics", data={"step": step, "train_loss": loss})
    page, more = store.list_events(jid, limit=2)
    assert [e["message"] for e in page] == ["Step 3", "Step 2"] and more
    assert page[0]["data"] == {"step": 3, "train_loss": 1.25} and page[0]["type"] == "metrics"
    rest, more = store.list_events(jid, after=page[-1]["id"], limit=10)
    assert [e["message"] for e in rest] == [
        "Step 3",
        "Step 2",
        "Step 1",
        f"Created fine-tuning job: {jid}",
    ] and not more
    assert [(m["step"], m["train_loss"]) for m in store.metrics(jid)] == [(1, 3.0), (2, 2.5), (3, 1.25)]


def test_fine_tuned_models_and_their_deletion(store, tmp_path):
    job = make_job(store, tmp_path)
    adapter = tmp_path / "ft" / job["id"] / "adapter"
    store.add_checkpoint(
        job["id"],
        5,
        {"step": 5, "train_loss": 1.0},
        "ft:m:fundament::x:ckpt-step-5",
        adapter.parent / "checkpoints" / "step-5",
    )
    assert [m["id"] for m in store.fine_tuned_models()] == [
        "ft:m:fundament::x:ckpt-step-5"
    ]  # the job has not succeeded
    assert lifecycle.queue(store, job["id"], {"n_epochs": 1}, "valid") and lifecycle.claim(store, "w", 1, stale_s=30)
    assert lifecycle.succeed(store, job["id"], "ft:m:fundament::x", str(adapter), 100, [])
    assert store.update_job(job["id"], None, finished_at=123)
    models = store.fine_tuned_models()
    assert [(m["id"], m["kind"], m["base_model"]) for m in models] == [
        ("ft:m:fundament::x", "model", "m"),
        ("ft:m:fundament::x:ckpt-step-5", "checkpoint", "m"),
    ]
    assert store.fine_tuned_model("ft:m:fundament::x")["created"] == 123
    ckpts, more = store.list_checkpoints(job["id"])
    assert [(c["step_number"], c["metrics"]["train_loss"], c["id"][:7]) for c in ckpts] == [
        (5, 1.0, "ftckpt_")
    ] and not more
    assert store.delete_fine_tuned_model("ft:m:fundament::x")["kind"] == "model"
    assert store.fine_tuned_models() == [] and store.list_checkpoints(job["id"])[0] == []
    assert store.delete_fine_tuned_model("ft:m:fundament::x") is None


# ---- migrations ----------------------------------------------------------------------------------

# The schema exactly as the first release (with no migrations: user_version 0) created it. Frozen
# here, not imported, so that a change to the store's own copy cannot hide a broken upgrade.
SCHEMA_V0 = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    created_at INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    status TEXT NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0        -- kept as a row so list cursors still resolve
);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    created_at INTEGER NOT NULL,
    model TEXT NOT NULL,                       -- as the request named it (may be an alias)
    base_model TEXT NOT NULL,                  -- the served model it resolves to
    training_file TEXT NOT NULL,
    validation_file TEXT,
    suffix TEXT,
    seed INTEGER NOT NULL,
    metadata TEXT,                             -- JSON object or NULL
    hyperparameters TEXT NOT NULL,             -- JSON: requested, replaced by resolved values
    extensions TEXT NOT NULL,                  -- JSON: our fenced fields (lora_r, ...)
    status TEXT NOT NULL,
    error TEXT,                                -- JSON {code, message, param}
    fine_tuned_model TEXT,
    finished_at INTEGER,
    estimated_finish INTEGER,
    trained_tokens INTEGER,
    result_files TEXT NOT NULL DEFAULT '[]',
    out_dir TEXT,
    adapter_dir TEXT,                          -- set on success: what the ft: model serves
    model_deleted INTEGER NOT NULL DEFAULT 0,
    worker TEXT,                               -- "host:pid:nonce" of the worker that holds it
    worker_pid INTEGER,
    heartbeat_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status);
CREATE INDEX IF NOT EXISTS jobs_model ON jobs (fine_tuned_model);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    job_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    level TEXT NOT NULL,
    message TEXT NOT NULL,
    type TEXT NOT NULL,
    data TEXT
);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id, seq);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    job_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    step_number INTEGER NOT NULL,
    metrics TEXT NOT NULL,
    model_id TEXT UNIQUE NOT NULL,
    path TEXT NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS checkpoints_job ON checkpoints (job_id, step_number);
"""


def make_v0_database(path, tmp_path):
    """A database as the first release left it: its schema, a file, a queued job with an event."""
    c = sqlite3.connect(path, isolation_level=None)
    c.execute("PRAGMA journal_mode=WAL")
    c.executescript(SCHEMA_V0)
    c.execute(
        "INSERT INTO files (id, created_at, bytes, filename, purpose, status) VALUES ('file-old', 1, 10, 'old.jsonl', 'fine-tune', 'processed')"
    )
    c.execute(
        "INSERT INTO jobs (id, created_at, model, base_model, training_file, validation_file, suffix, seed, metadata,"
        " hyperparameters, extensions, status, out_dir) VALUES ('ftjob-old', 1, 'm', 'm', 'file-old', NULL, NULL, 3, NULL,"
        " '{\"n_epochs\": 1}', '{}', 'queued', ?)",
        (str(tmp_path / "ft" / "ftjob-old"),),
    )
    c.execute(
        "INSERT INTO events (id, job_id, created_at, level, message, type) VALUES ('ftevent-old', 'ftjob-old', 1, 'info', 'Created', 'message')"
    )
    assert c.execute("PRAGMA user_version").fetchone()[0] == 0
    c.close()


def user_version(path) -> int:
    with sqlite3.connect(path) as c:
        return c.execute("PRAGMA user_version").fetchone()[0]


def test_a_database_from_the_first_release_opens_and_works(tmp_path):
    path = tmp_path / "fundament.sqlite3"
    make_v0_database(path, tmp_path)
    store = JobStore(path)
    assert user_version(path) == len(MIGRATIONS)
    # what the old release wrote reads back ...
    assert store.get_file("file-old")["filename"] == "old.jsonl"
    assert store.get_job("ftjob-old")["hyperparameters"] == {"n_epochs": 1}
    assert [e["message"] for e in store.list_events("ftjob-old")[0]] == ["Created"]
    # ... and every use goes on from it
    new = make_job(store, tmp_path)
    assert [j["id"] for j in store.list_jobs()[0]] == [new["id"], "ftjob-old"]
    assert lifecycle.claim(store, "w", 1, stale_s=30)["id"] == "ftjob-old"
    assert lifecycle.succeed(store, "ftjob-old", "ft:m:fundament::old", str(tmp_path / "a"), 10, [])
    assert [m["id"] for m in store.fine_tuned_models()] == ["ft:m:fundament::old"]
    store.add_file("file-new", "new.jsonl", "fine-tune", 5)
    assert [f["id"] for f in store.list_files()[0]] == ["file-new", "file-old"]
    assert store.delete_file("file-old") and store.list_files(after="file-old")[0] == []
    assert JobStore(path).get_job("ftjob-old")["status"] == Status.SUCCEEDED  # opened again: nothing re-run


COUNTED = "CREATE TABLE runs (n INTEGER);\nINSERT INTO runs VALUES (1);"


def test_a_migration_appended_later_runs_once_on_an_existing_database(tmp_path, monkeypatch):
    path = tmp_path / "fundament.sqlite3"
    make_v0_database(path, tmp_path)
    JobStore(path)  # this release's version
    later = [*MIGRATIONS, "ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;", COUNTED]
    monkeypatch.setattr(store_module, "MIGRATIONS", later)
    for _ in range(3):
        store = JobStore(path)
    assert user_version(path) == len(later)
    with sqlite3.connect(path) as c:
        assert c.execute("SELECT count(*) FROM runs").fetchone()[0] == 1
    assert store.get_job("ftjob-old")["priority"] == 0  # the new column reached the old row
    assert make_job(store, tmp_path)["priority"] == 0


def test_a_new_database_gets_every_migration(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "MIGRATIONS", [*MIGRATIONS, COUNTED])
    store = JobStore(tmp_path / "fundament.sqlite3")
    assert user_version(store.path) == len(MIGRATIONS) + 1
    with sqlite3.connect(store.path) as c:
        assert c.execute("SELECT count(*) FROM runs").fetchone()[0] == 1


def _open_with_counted(path, out):
    store_module.MIGRATIONS.append(COUNTED)  # this spawned process's own list
    JobStore(path)
    out.put(True)


def test_processes_opening_an_old_database_at_once_migrate_it_once(tmp_path):
    """The server and its worker open the store at the same moment: one migrates, the other waits."""
    path = tmp_path / "fundament.sqlite3"
    make_v0_database(path, tmp_path)
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_open_with_counted, args=(path, out)) for _ in range(3)]
    for p in procs:
        p.start()
    assert all(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join()
    assert user_version(path) == len(MIGRATIONS) + 1
    with sqlite3.connect(path) as c:
        assert c.execute("SELECT count(*) FROM runs").fetchone()[0] == 1


def test_a_database_from_a_newer_release_is_refused_naming_it(tmp_path):
    path = tmp_path / "fundament.sqlite3"
    JobStore(path)
    with sqlite3.connect(path) as c:
        c.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 5}")
    with pytest.raises(FundamentError, match="newer fundament"):
        JobStore(path)
