"""A fine-tuning job's life: its statuses, the transitions allowed between them, and each transition
as one conditional UPDATE (`... WHERE id = ? AND status IN (its from-states)`) with its events in
the same transaction. A transition returns whether it happened: False means the job had moved on
(cancelled meanwhile, say), so the server and the worker can race and neither overwrites the other.

It owns every status change; the store owns the rows, the worker the training, the server the wire.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum
from typing import TYPE_CHECKING, NamedTuple

from .job_data import drop_job_files

if TYPE_CHECKING:
    from .store import JobStore


class Status(StrEnum):
    """OpenAI's job statuses, and `paused` (this server can pause and resume a job)."""

    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    PAUSED = "paused"


ACTIVE = (Status.VALIDATING_FILES, Status.QUEUED, Status.RUNNING, Status.PAUSED)
FINISHED = (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)  # nothing leaves these


class Transition(NamedTuple):
    sources: tuple[Status, ...]  # in this order in the message that refuses it
    target: Status


TRANSITIONS: dict[str, Transition] = {
    "queue": Transition((Status.VALIDATING_FILES,), Status.QUEUED),  # its files are valid
    "claim": Transition((Status.QUEUED,), Status.RUNNING),  # a worker trains it
    "requeue": Transition((Status.RUNNING,), Status.QUEUED),  # its worker shut down or died
    "pause": Transition((Status.RUNNING, Status.QUEUED), Status.PAUSED),
    "resume": Transition((Status.PAUSED,), Status.QUEUED),  # the next claim continues it
    "succeed": Transition((Status.RUNNING,), Status.SUCCEEDED),
    "fail": Transition((Status.VALIDATING_FILES, Status.RUNNING), Status.FAILED),
    "cancel": Transition(ACTIVE, Status.CANCELLED),
}

# The state machine as a table: from each status, the statuses a job may move to.
ALLOWED: dict[Status, frozenset[Status]] = {
    s: frozenset(t.target for t in TRANSITIONS.values() if s in t.sources) for s in Status
}


def _move(
    store: JobStore,
    verb: str,
    job_id: str | None,
    events: tuple[tuple[str, str], ...] = (),
    guard: str = "",
    guard_args: tuple = (),
    **fields,
) -> str | None:
    """The one UPDATE behind every transition: `verb`'s target status and `fields`, where the job
    is in one of verb's from-states (and `guard` holds), with `events` [(message, level)] in the
    same transaction. job_id None: the oldest job in a from-state. The id moved, or None. A job
    that has ended loses its copy of its files here (a training worker holds its own in memory)."""
    t = TRANSITIONS[verb]
    cols = {"status": t.target, **fields}
    sources = ", ".join("?" * len(t.sources))
    which = "?" if job_id is not None else f"(SELECT id FROM jobs WHERE status IN ({sources}) ORDER BY seq LIMIT 1)"
    sql = (
        f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in cols)} WHERE id = {which}"
        f" AND status IN ({sources}) {guard} RETURNING id, out_dir"
    )
    args = (*store.encode(cols), *((job_id,) if job_id is not None else t.sources), *t.sources, *guard_args)
    with store.transaction() as c:
        rows = c.execute(sql, args).fetchall()
        if not rows:
            return None
        moved, out_dir = rows[0]
        for message, level in events:
            store.insert_event(c, moved, message, level)
    if t.target in FINISHED:
        drop_job_files(out_dir)
    return moved


# ---- the server's requests -------------------------------------------------------------------


def cancel(store: JobStore, job_id: str) -> bool:
    return (
        _move(
            store,
            "cancel",
            job_id,
            (("Fine-tuning job cancelled", "info"),),
            finished_at=int(time.time()),
            estimated_finish=None,
        )
        is not None
    )


def pause(store: JobStore, job_id: str) -> bool:
    """Paused; a worker training it stops after its current step and saves its state."""
    return _move(store, "pause", job_id, (("Fine-tuning job paused", "info"),), estimated_finish=None) is not None


def resume(store: JobStore, job_id: str) -> bool:
    return (
        _move(store, "resume", job_id, (("Fine-tuning job resumed; queued to continue from its saved state", "info"),))
        is not None
    )


# ---- the worker's ----------------------------------------------------------------------------


def queue(store: JobStore, job_id: str, hyperparameters: dict, event: str) -> bool:
    """Files valid: queued with its hyperparameters resolved."""
    return _move(store, "queue", job_id, ((event, "info"),), hyperparameters=hyperparameters) is not None


def claim(store: JobStore, worker: str, pid: int, stale_s: float) -> dict | None:
    """The oldest queued job, now `running` and held by `worker`; None if none is queued or
    another live worker is training already (one job trains at a time on this machine)."""
    now = time.time()
    busy = "AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.status = ? AND j.worker IS NOT ? AND j.heartbeat_at > ?)"
    job_id = _move(
        store,
        "claim",
        None,
        guard=busy,
        guard_args=(Status.RUNNING, worker, now - stale_s),
        worker=worker,
        worker_pid=pid,
        heartbeat_at=now,
        estimated_finish=None,
    )
    return None if job_id is None else store.get_job(job_id)


def requeue(
    store: JobStore, job_id: str, event: str, level: str = "info", guard: str = "", guard_args: tuple = ()
) -> bool:
    """Back to queued, held by no worker; the next claim resumes it from its last checkpoint."""
    return (
        _move(
            store,
            "requeue",
            job_id,
            ((event, level),),
            guard,
            guard_args,
            worker=None,
            worker_pid=None,
            estimated_finish=None,
        )
        is not None
    )


def requeue_orphans(store: JobStore, stale_s: float, is_dead: Callable[[dict], bool]) -> list[dict]:
    """Running jobs whose worker is gone (`is_dead(row)`, or no heartbeat for stale_s) go back to
    queued. Each only if its worker and heartbeat are still those read: a beat since, it stays."""
    now = time.time()
    out = []
    for row in store.jobs_with_status(Status.RUNNING):
        gone = (row["heartbeat_at"] or 0) < now - stale_s or is_dead(row)
        if gone and requeue(
            store,
            row["id"],
            "The worker training this job stopped unexpectedly; the job is queued again and resumes from its last checkpoint.",
            "warn",
            "AND worker IS ? AND heartbeat_at IS ?",
            (row["worker"], row["heartbeat_at"]),
        ):
            out.append(row)
    return out


def succeed(
    store: JobStore, job_id: str, fine_tuned_model: str, adapter_dir: str, trained_tokens: int, result_files: list[str]
) -> bool:
    events = (
        (f"New fine-tuned model created: {fine_tuned_model}", "info"),
        ("The job has successfully completed", "info"),
    )
    return (
        _move(
            store,
            "succeed",
            job_id,
            events,
            fine_tuned_model=fine_tuned_model,
            adapter_dir=adapter_dir,
            trained_tokens=trained_tokens,
            finished_at=int(time.time()),
            estimated_finish=None,
            result_files=result_files,
        )
        is not None
    )


def fail(store: JobStore, job_id: str, code: str, message: str, param: str | None) -> bool:
    """Failed with OpenAI's {code, message, param}, from validation or training."""
    return (
        _move(
            store,
            "fail",
            job_id,
            ((f"Fine-tuning job failed: {message}", "error"),),
            error={"code": code, "message": message, "param": param},
            finished_at=int(time.time()),
            estimated_finish=None,
        )
        is not None
    )
