"""Batches in the SQLite store: their rows, status changes (each a conditional UPDATE, so a cancel
and the runner never both win), and each request's result, recorded as it finishes together with
the live request counts. Knows no HTTP and no engines: server/serving_batches.py runs them.
"""

from __future__ import annotations

import json
import time

from .store import JobStore, _inserted, new_id

# OpenAI's statuses: validating -> in_progress -> finalizing -> completed; failed (the input file
# is unusable); cancelling -> cancelled; expired (not done within the completion window).
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
COMPLETION_WINDOWS = {"24h": 24 * 3600}


class BatchStore:
    def __init__(self, store: JobStore):
        self.store = store

    def create(self, endpoint: str, input_file_id: str, completion_window: str, metadata: dict | None) -> dict:
        now = int(time.time())
        bid = new_id("batch", "_")
        with self.store.transaction() as c:
            c.execute(
                "INSERT INTO batches (id, created_at, endpoint, input_file_id, completion_window, status, metadata, "
                "expires_at) VALUES (?, ?, ?, ?, ?, 'validating', ?, ?)",
                (
                    bid,
                    now,
                    endpoint,
                    input_file_id,
                    completion_window,
                    None if metadata is None else json.dumps(metadata),
                    now + COMPLETION_WINDOWS[completion_window],
                ),
            )
            return _inserted(c, "batches", bid)

    def get(self, batch_id: str) -> dict | None:
        return self.store._one("SELECT * FROM batches WHERE id = ?", (batch_id,))

    def page(self, after: str | None, limit: int) -> tuple[list[dict], bool]:
        """Newest first, as OpenAI lists them."""
        where, args = "1", []
        if after:
            where, args = "seq < ?", [self.store._seq("batches", after)]
        rows = self.store._all(f"SELECT * FROM batches WHERE {where} ORDER BY seq DESC LIMIT ?", (*args, limit + 1))
        return rows[:limit], len(rows) > limit

    def active(self) -> list[dict]:
        """Batches with work left, oldest first."""
        marks = ",".join("?" * len(ACTIVE))
        return self.store._all(f"SELECT * FROM batches WHERE status IN ({marks}) ORDER BY seq", ACTIVE)

    def move(self, batch_id: str, allowed: tuple[str, ...], status: str, **fields) -> bool:
        """-> status (with its `<status>_at` time and `fields`) if the batch is in `allowed` now."""
        fields = {f"{status}_at": int(time.time()), **fields} if f"{status}_at" in _TIMES else fields
        fields = {k: json.dumps(v) if k == "errors" and v is not None else v for k, v in fields.items()}
        sets = ", ".join(["status = ?", *(f"{k} = ?" for k in fields)])
        marks = ",".join("?" * len(allowed))
        with self.store.transaction() as c:
            n = c.execute(
                f"UPDATE batches SET {sets} WHERE id = ? AND status IN ({marks})",
                (status, *fields.values(), batch_id, *allowed),
            ).rowcount
        return n == 1

    def set_total(self, batch_id: str, total: int) -> None:
        with self.store.transaction() as c:
            c.execute("UPDATE batches SET total = ? WHERE id = ?", (total, batch_id))

    def record(self, batch_id: str, line: int, ok: bool, body: dict) -> bool:
        """One request's result, and the count it adds to, in one transaction; False if that line
        has a result already (a request redone after a restart is counted once)."""
        with self.store.transaction() as c:
            n = c.execute(
                "INSERT OR IGNORE INTO batch_results (batch_id, line, ok, body) VALUES (?, ?, ?, ?)",
                (batch_id, line, int(ok), json.dumps(body)),
            ).rowcount
            if n:
                column = "completed" if ok else "failed"
                c.execute(f"UPDATE batches SET {column} = {column} + 1 WHERE id = ?", (batch_id,))
        return n == 1

    def done_lines(self, batch_id: str) -> set[int]:
        with self.store._conn() as c:
            return {r[0] for r in c.execute("SELECT line FROM batch_results WHERE batch_id = ?", (batch_id,))}

    def results(self, batch_id: str) -> list[dict]:
        """Every result so far, in the input file's order: {line, ok, body}."""
        with self.store._conn() as c:
            rows = c.execute(
                "SELECT line, ok, body FROM batch_results WHERE batch_id = ? ORDER BY line", (batch_id,)
            ).fetchall()
        return [{"line": r[0], "ok": bool(r[1]), "body": json.loads(r[2])} for r in rows]


_TIMES = {
    "in_progress_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
}
