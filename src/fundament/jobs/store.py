"""The durable record of files, fine-tuning jobs, their events and checkpoints: one SQLite file.

WAL mode and short transactions, so the server and worker processes share it safely. The schema
grows by MIGRATIONS, numbered by `PRAGMA user_version`. Rows come back as plain dicts (JSON columns
decoded). Status changes are jobs/lifecycle.py's; this knows nothing of HTTP wire types, training,
or where file bytes live.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from ..config import fundament_home
from ..errors import FundamentError, InvalidRequestError
from .lifecycle import Status

# The schema as the first release made it (with no user_version: version 0). IF NOT EXISTS, so it
# is a no-op on such a database and creates everything on a new one.
SCHEMA_V1 = """
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

# Migration i takes a database from user_version i to i + 1, and each runs once, in the same
# transaction as the version it sets. Only ever append: a release's database is at the length of
# its list. A column added later is `ALTER TABLE jobs ADD COLUMN ...` (with a DEFAULT for old rows).
# Version 2: the Batches API (jobs/batches.py). A batch's results are rows as they finish, so a
# restarted server continues where it stopped; the output and error files are made from them.
BATCHES = """
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    created_at INTEGER NOT NULL,
    endpoint TEXT NOT NULL,
    input_file_id TEXT NOT NULL,
    completion_window TEXT NOT NULL,
    status TEXT NOT NULL,
    metadata TEXT,                             -- JSON object or NULL
    errors TEXT,                               -- JSON list of {code, message, param, line}, or NULL
    output_file_id TEXT,
    error_file_id TEXT,
    in_progress_at INTEGER,
    expires_at INTEGER,
    finalizing_at INTEGER,
    completed_at INTEGER,
    failed_at INTEGER,
    expired_at INTEGER,
    cancelling_at INTEGER,
    cancelled_at INTEGER,
    total INTEGER NOT NULL DEFAULT 0,
    completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS batches_status ON batches (status);
CREATE TABLE IF NOT EXISTS batch_results (
    batch_id TEXT NOT NULL,
    line INTEGER NOT NULL,                     -- 1-based line of the input file
    ok INTEGER NOT NULL,                       -- 1: the output file's; 0: the error file's
    body TEXT NOT NULL,                        -- that file's line (JSON)
    PRIMARY KEY (batch_id, line)
);
"""

MIGRATIONS: list[str] = [SCHEMA_V1, BATCHES]

# A failed job has no model, as OpenAI's: the checkpoints it saved before it failed (a run that
# diverged, say) are neither listed nor served.
_NOT_FAILED = f"job_id NOT IN (SELECT id FROM jobs WHERE status = '{Status.FAILED}')"
_JSON = {"metadata", "hyperparameters", "extensions", "error", "result_files", "data", "metrics", "errors"}


def new_id(prefix: str, sep: str = "-") -> str:
    return f"{prefix}{sep}{uuid.uuid4().hex[:24]}"


def default_db_path() -> Path:
    return fundament_home() / "fundament.sqlite3"


def _statements(script: str) -> list[str]:
    """A script's statements, one by one (executescript would commit the migration's transaction)."""
    out, buf = [], ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            out.append(buf.strip())
            buf = ""
    assert not buf.strip(), f"an incomplete statement in a migration: {buf!r}"
    return out


def _row(r: sqlite3.Row) -> dict:
    return {k: (json.loads(r[k]) if k in _JSON and r[k] is not None else r[k]) for k in r.keys()}


def _inserted(c: sqlite3.Connection, table: str, id_: str) -> dict:
    """The row this transaction has just inserted."""
    r = c.execute(f"SELECT * FROM {table} WHERE id = ?", (id_,)).fetchone()
    assert r is not None  # inserted by the caller in the same transaction
    return _row(r)


class JobStore:
    """Files, jobs, events and checkpoints in one SQLite file; safe from several processes."""

    def __init__(self, path: str | Path | None = None, busy_timeout_s: float = 30.0):
        self.path = Path(path) if path else default_db_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.busy_timeout_s = busy_timeout_s
        with self._conn() as c:
            c.execute("PRAGMA journal_mode=WAL")
        self._migrate()

    def _migrate(self) -> None:
        """Bring the database to len(MIGRATIONS); the server and worker may both open it at once."""
        with self.transaction() as c:
            version = c.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise FundamentError(
                    f"{self.path} was written by a newer fundament (schema version {version}; this one knows up to {len(MIGRATIONS)}). Upgrade fundament, or point FUNDAMENT_HOME elsewhere."
                )
            for script in MIGRATIONS[version:]:
                for statement in _statements(script):
                    c.execute(statement)
            if version < len(MIGRATIONS):
                c.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")

    @contextmanager
    def _conn(self):
        """One short-lived connection per operation: nothing is shared across threads or processes."""
        c = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
        c.row_factory = sqlite3.Row
        c.execute("PRAGMA synchronous=FULL")  # a SIGKILL or power cut loses no committed job state
        try:
            yield c
        finally:
            c.close()

    @contextmanager
    def transaction(self):
        """A write transaction taken up front (BEGIN IMMEDIATE), so read-then-write is atomic."""
        with self._conn() as c:
            c.execute("BEGIN IMMEDIATE")
            try:
                yield c
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise

    def _one(self, sql: str, args=()) -> dict | None:
        with self._conn() as c:
            r = c.execute(sql, args).fetchone()
            return None if r is None else _row(r)

    def _all(self, sql: str, args=()) -> list[dict]:
        with self._conn() as c:
            return [_row(r) for r in c.execute(sql, args).fetchall()]

    def _seq(self, table: str, id_: str, param: str = "after", where: str = "", args=()) -> int:
        r = self._one(f"SELECT seq FROM {table} WHERE id = ? {where}", (id_, *args))
        if r is None:
            raise InvalidRequestError(
                f"'{param}' names no item of this list: {id_!r}. Pass the id of an item from a previous page.", param
            )
        return r["seq"]

    # ---- files ---------------------------------------------------------------------------------

    def add_file(self, file_id: str, filename: str, purpose: str, nbytes: int, status: str = "processed") -> dict:
        with self.transaction() as c:
            c.execute(
                "INSERT INTO files (id, created_at, bytes, filename, purpose, status) VALUES (?, ?, ?, ?, ?, ?)",
                (file_id, int(time.time()), nbytes, filename, purpose, status),
            )
            return _inserted(c, "files", file_id)

    def get_file(self, file_id: str) -> dict | None:
        return self._one("SELECT * FROM files WHERE id = ? AND deleted = 0", (file_id,))

    def file_ids(self) -> set[str]:
        """Every file id with a live row (the file store sweeps bytes without one)."""
        with self._conn() as c:
            return {r[0] for r in c.execute("SELECT id FROM files WHERE deleted = 0")}

    def list_files(
        self, after: str | None = None, limit: int = 10000, order: str = "desc", purpose: str | None = None
    ) -> tuple[list[dict], bool]:
        """One page of files and whether more follow."""
        where = ["deleted = 0"]
        args: list[str | int] = []
        if purpose:
            where.append("purpose = ?")
            args.append(purpose)
        if after:
            where.append("seq < ?" if order == "desc" else "seq > ?")
            args.append(self._seq("files", after))
        rows = self._all(
            f"SELECT * FROM files WHERE {' AND '.join(where)} ORDER BY seq {'DESC' if order == 'desc' else 'ASC'} LIMIT ?",
            (*args, limit + 1),
        )
        return rows[:limit], len(rows) > limit

    def delete_file(self, file_id: str) -> bool:
        with self.transaction() as c:
            return c.execute("UPDATE files SET deleted = 1 WHERE id = ? AND deleted = 0", (file_id,)).rowcount == 1

    # ---- jobs ----------------------------------------------------------------------------------

    def create_job(
        self,
        *,
        model: str,
        base_model: str,
        training_file: str,
        validation_file: str | None,
        suffix: str | None,
        seed: int,
        metadata: dict | None,
        hyperparameters: dict,
        extensions: dict,
        out_root: Path,
        job_id: str | None = None,
    ) -> dict:
        """A new job, `validating_files`, its output under out_root/<id>. `job_id` when the caller
        chose it beforehand (to put the job's copy of its files in place before the row exists)."""
        job_id = job_id or new_id("ftjob")
        with self.transaction() as c:
            c.execute(
                "INSERT INTO jobs (id, created_at, model, base_model, training_file, validation_file, suffix, seed, metadata,"
                " hyperparameters, extensions, status, out_dir) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job_id,
                    int(time.time()),
                    model,
                    base_model,
                    training_file,
                    validation_file,
                    suffix,
                    seed,
                    None if metadata is None else json.dumps(metadata),
                    json.dumps(hyperparameters),
                    json.dumps(extensions),
                    Status.VALIDATING_FILES,
                    str(Path(out_root) / job_id),
                ),
            )
            self.insert_event(c, job_id, f"Created fine-tuning job: {job_id}")
            return _inserted(c, "jobs", job_id)

    def get_job(self, job_id: str) -> dict | None:
        return self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))

    def list_jobs(
        self,
        after: str | None = None,
        limit: int = 20,
        metadata: dict[str, str] | None = None,
        null_metadata: bool = False,
    ) -> tuple[list[dict], bool]:
        """Newest first, as OpenAI lists them; `metadata` keeps jobs whose metadata holds every k=v."""
        where = ["1"]
        args: list[str | int] = []
        if after:
            where.append("seq < ?")
            args.append(self._seq("jobs", after))
        if null_metadata:
            where.append("metadata IS NULL")
        for k, v in (metadata or {}).items():  # json_each: any key, no JSON-path quoting
            where.append("EXISTS (SELECT 1 FROM json_each(jobs.metadata) WHERE key = ? AND value = ?)")
            args += [k, v]
        rows = self._all(
            f"SELECT * FROM jobs WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT ?", (*args, limit + 1)
        )
        return rows[:limit], len(rows) > limit

    @staticmethod
    def encode(fields: dict) -> list:
        """Column values as stored (the JSON columns as text)."""
        return [json.dumps(v) if k in _JSON and v is not None else v for k, v in fields.items()]

    def update_job(
        self,
        job_id: str,
        from_status: tuple[Status, ...] | None = None,
        event: str | None = None,
        level: str = "info",
        **fields,
    ) -> bool:
        """Set fields if the job is in one of `from_status`; with an event in the same transaction.
        False when the job had moved on (paused meanwhile, say). The status itself changes only
        by a transition of jobs/lifecycle.py."""
        assert "status" not in fields, "status changes go through jobs.lifecycle"
        sets = ", ".join(f"{k} = ?" for k in fields)
        cond, cargs = "", []
        if from_status is not None:
            cond = f" AND status IN ({', '.join('?' * len(from_status))})"
            cargs = list(from_status)
        with self.transaction() as c:
            if fields:
                n = c.execute(
                    f"UPDATE jobs SET {sets} WHERE id = ?{cond}", (*self.encode(fields), job_id, *cargs)
                ).rowcount
            else:  # only the event, if the job is still where the caller thinks
                n = c.execute(f"SELECT 1 FROM jobs WHERE id = ?{cond}", (job_id, *cargs)).fetchone() is not None
            if n and event:
                self.insert_event(c, job_id, event, level)
        return bool(n)

    def heartbeat(self, job_id: str, worker: str) -> bool:
        with self.transaction() as c:
            return (
                c.execute(
                    "UPDATE jobs SET heartbeat_at = ? WHERE id = ? AND worker = ? AND status = ?",
                    (time.time(), job_id, worker, Status.RUNNING),
                ).rowcount
                == 1
            )

    def count_by_status(self) -> dict[str, int]:
        return {r["status"]: r["n"] for r in self._all("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status", ())}

    def last_metrics(self, job_id: str) -> dict | None:
        """The `data` of the job's latest metrics event."""
        rows = self._all(
            "SELECT data FROM events WHERE job_id = ? AND type = 'metrics' ORDER BY seq DESC LIMIT 1", (job_id,)
        )
        return rows[0]["data"] if rows else None

    def jobs_with_status(self, status: Status) -> list[dict]:
        return self._all("SELECT * FROM jobs WHERE status = ? ORDER BY seq", (status,))

    # ---- events --------------------------------------------------------------------------------

    @staticmethod
    def insert_event(
        c, job_id: str, message: str, level: str = "info", type: str = "message", data: dict | None = None
    ) -> None:
        c.execute(
            "INSERT INTO events (id, job_id, created_at, level, message, type, data) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                new_id("ftevent"),
                job_id,
                int(time.time()),
                level,
                message,
                type,
                None if data is None else json.dumps(data),
            ),
        )

    def add_event(
        self, job_id: str, message: str, level: str = "info", type: str = "message", data: dict | None = None
    ) -> None:
        with self.transaction() as c:
            self.insert_event(c, job_id, message, level, type, data)

    def list_events(self, job_id: str, after: str | None = None, limit: int = 20) -> tuple[list[dict], bool]:
        """Newest first, as OpenAI lists them; `after` pages towards older events."""
        where = "job_id = ?"
        args: list[str | int] = [job_id]
        if after:
            where += " AND seq < ?"
            args.append(self._seq("events", after, where="AND job_id = ?", args=(job_id,)))
        rows = self._all(f"SELECT * FROM events WHERE {where} ORDER BY seq DESC LIMIT ?", (*args, limit + 1))
        return rows[:limit], len(rows) > limit

    def metrics(self, job_id: str) -> list[dict]:
        """The `data` of every metrics event, oldest first, one per step (a step redone after a
        resume keeps its latest values)."""
        by_step: dict[int, dict] = {}
        for r in self._all("SELECT data FROM events WHERE job_id = ? AND type = 'metrics' ORDER BY seq", (job_id,)):
            by_step[r["data"]["step"]] = r["data"]
        return [by_step[s] for s in sorted(by_step)]

    # ---- checkpoints ---------------------------------------------------------------------------

    def add_checkpoint(self, job_id: str, step: int, metrics: dict, model_id: str, path: Path) -> dict:
        ckpt_id = new_id("ftckpt", "_")
        with self.transaction() as c:
            c.execute("DELETE FROM checkpoints WHERE model_id = ?", (model_id,))  # a step redone after a resume
            c.execute(
                "INSERT INTO checkpoints (id, job_id, created_at, step_number, metrics, model_id, path) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (ckpt_id, job_id, int(time.time()), step, json.dumps(metrics), model_id, str(path)),
            )
            self.insert_event(c, job_id, f"Checkpoint created at step {step}")
            return _inserted(c, "checkpoints", ckpt_id)

    def add_checkpoint_metrics(self, job_id: str, step: int, metrics: dict) -> None:
        """Merge metrics known only after the run (full validation) into a checkpoint's."""
        with self.transaction() as c:
            r = c.execute(
                "SELECT id, metrics FROM checkpoints WHERE job_id = ? AND step_number = ?", (job_id, step)
            ).fetchone()
            if r is not None:
                c.execute(
                    "UPDATE checkpoints SET metrics = ? WHERE id = ?",
                    (json.dumps({**json.loads(r["metrics"]), **metrics}), r["id"]),
                )

    def list_checkpoints(self, job_id: str, after: str | None = None, limit: int = 10) -> tuple[list[dict], bool]:
        """Newest step first; checkpoints whose model was deleted, and those of a failed job, are left out."""
        where = f"job_id = ? AND deleted = 0 AND {_NOT_FAILED}"
        args: list[str | int] = [job_id]
        if after:
            where += " AND seq < ?"
            args.append(self._seq("checkpoints", after, where="AND job_id = ?", args=(job_id,)))
        rows = self._all(f"SELECT * FROM checkpoints WHERE {where} ORDER BY seq DESC LIMIT ?", (*args, limit + 1))
        return rows[:limit], len(rows) > limit

    # ---- fine-tuned models ---------------------------------------------------------------------

    def fine_tuned_models(self) -> list[dict]:
        """Every servable ft: model and checkpoint: {id, base_model, created, path, job_id, out_dir, kind}
        (a failed job's checkpoints are not)."""
        jobs = self._all(
            "SELECT fine_tuned_model AS id, base_model, finished_at AS created, adapter_dir AS path, id AS job_id, out_dir, 'model' AS kind"
            f" FROM jobs WHERE status = '{Status.SUCCEEDED}' AND model_deleted = 0 AND adapter_dir IS NOT NULL ORDER BY seq"
        )
        ckpts = self._all(
            "SELECT c.model_id AS id, j.base_model, c.created_at AS created, c.path, j.id AS job_id, j.out_dir, 'checkpoint' AS kind"
            f" FROM checkpoints c JOIN jobs j ON j.id = c.job_id WHERE c.deleted = 0 AND j.model_deleted = 0 AND j.status != '{Status.FAILED}'"
            " ORDER BY c.seq"
        )
        return jobs + ckpts

    def fine_tuned_model(self, model_id: str) -> dict | None:
        return next((m for m in self.fine_tuned_models() if m["id"] == model_id), None)

    def delete_fine_tuned_model(self, model_id: str) -> dict | None:
        """Mark an ft: model (with its checkpoints) or one checkpoint deleted; the row it was, or None."""
        m = self.fine_tuned_model(model_id)
        if m is None:
            return None
        with self.transaction() as c:
            if m["kind"] == "model":
                c.execute("UPDATE jobs SET model_deleted = 1 WHERE id = ?", (m["job_id"],))
                c.execute("UPDATE checkpoints SET deleted = 1 WHERE job_id = ?", (m["job_id"],))
            else:
                c.execute("UPDATE checkpoints SET deleted = 1 WHERE model_id = ?", (model_id,))
            self.insert_event(c, m["job_id"], f"Model deleted: {model_id}")
        return m

    @staticmethod
    def discard_fine_tuned_files(model: dict) -> None:
        """Remove a deleted model's files (once nothing serves it): a job's model takes the job's
        whole output, checkpoints included; a checkpoint its own directory."""
        shutil.rmtree(model["out_dir"] if model["kind"] == "model" else model["path"], ignore_errors=True)


def worker_identity() -> tuple[str, int]:
    """("host:pid:nonce", pid): unique per worker process even if a pid is reused."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}", os.getpid()
