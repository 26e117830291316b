"""The Batches API: /v1/batches (create, retrieve, list, cancel) and the runner that works through
batches in the server's own event loop. Each line of a `purpose: "batch"` file is one request to
the batch's endpoint, run through the same handler as over HTTP, at a lower priority than
interactive requests (the engine starts waiting interactive sequences first, and a batch keeps at
most half the engine's batch slots busy). Each result is recorded as it finishes, so a restarted
server continues where it stopped; a bad line becomes a line of the error file, never a failed batch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from ..config import fundament_home
from ..errors import FundamentError, InvalidRequestError, NotFoundError
from ..jobs.batches import ACTIVE, COMPLETION_WINDOWS, BatchStore
from ..jobs.files import FileStore
from ..jobs.store import new_id
from .generation import in_batch
from .limits import check_limit
from .metrics import RequestRecord, ServerMetrics, request_scope
from .protocol_batches import BATCH_ENDPOINTS, Batch, BatchList, CreateBatchRequest, batch_object
from .validation import validation_error

log = logging.getLogger(__name__)

RETRY_S = 1.0  # a request the engine refused for now (queue full, backend restarting) is tried again after this
Execute = dict[str, tuple[type[BaseModel], Callable[[Any], Awaitable[BaseModel]]]]


def batch_dir(batch_id: str) -> Path:
    return fundament_home() / "batches" / batch_id


class BatchHandler:
    def __init__(self, batches: BatchStore, files: FileStore, wake: asyncio.Event | None = None):
        self.batches, self.files = batches, files
        self.wake = wake or asyncio.Event()

    def create(self, req: CreateBatchRequest) -> Batch:
        if req.endpoint not in BATCH_ENDPOINTS:
            raise InvalidRequestError(
                f"endpoint {req.endpoint!r} cannot be batched here; use one of {', '.join(BATCH_ENDPOINTS)}.",
                "endpoint",
            )
        if req.completion_window not in COMPLETION_WINDOWS:
            raise InvalidRequestError(
                f"completion_window must be one of {', '.join(COMPLETION_WINDOWS)}, got {req.completion_window!r}.",
                "completion_window",
            )
        row = self.files.store.get_file(req.input_file_id)
        if row is None or row.get("deleted"):
            raise InvalidRequestError(f"invalid input_file_id: no file {req.input_file_id!r}.", "input_file_id")
        if row["purpose"] != "batch":
            raise InvalidRequestError(
                f"input_file_id {req.input_file_id} was uploaded with purpose {row['purpose']!r}; "
                "upload the requests with purpose 'batch'.",
                "input_file_id",
            )
        batch = self.batches.create(req.endpoint, req.input_file_id, req.completion_window, req.metadata)
        try:  # the batch's own copy: deleting the uploaded file later cannot hurt it
            self.files.keep(req.input_file_id, batch_dir(batch["id"]) / "input.jsonl")
        except FileNotFoundError:
            self.batches.move(
                batch["id"], ("validating",), "failed", errors=[_error("file_deleted", "The input file was deleted.")]
            )
        self.wake.set()
        return batch_object(self._get(batch["id"]))

    def _get(self, batch_id: str) -> dict:
        row = self.batches.get(batch_id)
        if row is None:
            raise NotFoundError(f"No batch with id {batch_id!r}.", "batch_id")
        return row

    def retrieve(self, batch_id: str) -> Batch:
        return batch_object(self._get(batch_id))

    def list(self, after: str | None, limit: int) -> BatchList:
        check_limit(limit, 100)
        rows, more = self.batches.page(after, limit)
        data = [batch_object(r) for r in rows]
        return BatchList(
            data=data, has_more=more, first_id=data[0].id if data else None, last_id=data[-1].id if data else None
        )

    def cancel(self, batch_id: str) -> Batch:
        row = self._get(batch_id)
        if not self.batches.move(batch_id, ("validating", "in_progress"), "cancelling"):
            row = self._get(batch_id)
            if row["status"] not in ("cancelling", "cancelled"):
                raise InvalidRequestError(
                    f"Batch {batch_id} is {row['status']}; only a validating or in-progress batch can be cancelled.",
                    "batch_id",
                )
        self.wake.set()
        return batch_object(self._get(batch_id))


def _error(code: str, message: str, line: int | None = None, param: str | None = None) -> dict:
    return {"code": code, "message": message, "param": param, "line": line}


@dataclass
class Line:
    number: int
    custom_id: str | None
    body: dict | None
    error: tuple[str, str] | None = None  # (code, message) of a line that is no request


def parse_lines(data: bytes, endpoint: str) -> list[Line]:
    """The input file's requests, one per non-blank line; a line that is no usable request carries
    the error that says why (it goes to the error file, the others still run)."""
    out: list[Line] = []
    seen: set[str] = set()
    for n, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            out.append(Line(n, None, None, ("invalid_json_line", f"Line {n} is not valid JSON: {e}.")))
            continue
        cid = obj.get("custom_id") if isinstance(obj, dict) else None
        problem = None
        if not isinstance(obj, dict):
            problem = ("invalid_request", f"Line {n} must be a JSON object with custom_id, method, url and body.")
        elif not isinstance(cid, str) or not cid:
            problem = ("missing_custom_id", f"Line {n} has no custom_id (a non-empty string).")
        elif cid in seen:
            problem = ("duplicate_custom_id", f"Line {n} repeats custom_id {cid!r}; each must be unique in the file.")
        elif obj.get("method", "POST") != "POST":
            problem = ("invalid_method", f"Line {n} has method {obj.get('method')!r}; only POST is supported.")
        elif obj.get("url") != endpoint:
            problem = (
                "mismatched_endpoint",
                f"Line {n} is for {obj.get('url')!r}, but this batch's endpoint is {endpoint}.",
            )
        elif not isinstance(obj.get("body"), dict):
            problem = ("invalid_body", f"Line {n} has no body (a JSON object: the request).")
        if isinstance(cid, str):
            seen.add(cid)
        out.append(Line(n, cid if isinstance(cid, str) else None, None if problem else obj["body"], problem))
    return out


class BatchRunner:
    """Works through active batches, oldest first, in the server's event loop."""

    def __init__(self, batches: BatchStore, files: FileStore, execute: Execute, concurrency: int,
                 metrics: ServerMetrics | None = None, wake: asyncio.Event | None = None):  # fmt: skip
        self.batches, self.files, self.execute = batches, files, execute
        self.concurrency, self.metrics = max(1, concurrency), metrics
        self.wake = wake or asyncio.Event()

    async def run(self, poll_s: float = 1.0) -> None:
        while True:
            for batch in await asyncio.to_thread(self.batches.active):
                try:
                    await self.work(batch)
                except asyncio.CancelledError:
                    raise
                except Exception:  # a bug in one batch must not stop the others: it stays active and is retried
                    log.exception("batch %s", batch["id"])
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), poll_s)
            except TimeoutError:
                pass

    async def work(self, batch: dict) -> None:
        bid = batch["id"]
        if batch["status"] in ("cancelling", "finalizing"):
            return await self.finish(batch)
        try:
            data = await asyncio.to_thread((batch_dir(bid) / "input.jsonl").read_bytes)
        except FileNotFoundError:
            self.batches.move(bid, ACTIVE, "failed", errors=[_error("file_missing", "The batch's input copy is gone.")])
            return
        lines = parse_lines(data, batch["endpoint"])
        if batch["status"] == "validating":
            if not lines:
                self.batches.move(
                    bid, ("validating",), "failed", errors=[_error("empty_file", "The input file has no requests.")]
                )
                return
            self.batches.set_total(bid, len(lines))
            if not self.batches.move(bid, ("validating",), "in_progress"):
                return  # cancelled meanwhile: finished on the next round
        done = await asyncio.to_thread(self.batches.done_lines, bid)
        pending = [ln for ln in lines if ln.number not in done]
        slots = asyncio.Semaphore(self.concurrency)
        stop = asyncio.Event()

        async def one(line: Line) -> None:
            async with slots:
                if stop.is_set():
                    return
                row = await asyncio.to_thread(self.batches.get, bid)
                if row is None or row["status"] != "in_progress" or time.time() > row["expires_at"]:
                    stop.set()
                    return
                ok, body = await self.request(batch["endpoint"], line)
                await asyncio.to_thread(self.batches.record, bid, line.number, ok, body)

        await asyncio.gather(*(one(ln) for ln in pending))
        row = await asyncio.to_thread(self.batches.get, bid)
        assert row is not None
        if row["status"] == "in_progress" and time.time() > row["expires_at"]:
            return await self.finish(row, expired=True)  # what finished in the window is kept
        if row["status"] == "in_progress" and not stop.is_set():
            self.batches.move(bid, ("in_progress",), "finalizing")
        await self.finish(await asyncio.to_thread(self.batches.get, bid))

    async def finish(self, batch: dict | None, expired: bool = False) -> None:
        """Write the output and error files from the results so far (in the input's order), then
        -> completed, cancelled or expired."""
        if batch is None or batch["status"] not in ("finalizing", "cancelling", "in_progress"):
            return
        bid = batch["id"]
        results = await asyncio.to_thread(self.batches.results, bid)

        def write(ok: bool, suffix: str) -> str | None:
            rows = [r["body"] for r in results if r["ok"] == ok]
            if not rows:
                return None
            data = "".join(json.dumps(r) + "\n" for r in rows).encode()
            return self.files.add_bytes(data, f"{bid}_{suffix}.jsonl", "batch_output")["id"]

        output, errors = await asyncio.to_thread(write, True, "output"), await asyncio.to_thread(write, False, "error")
        final = "expired" if expired else {"finalizing": "completed", "cancelling": "cancelled"}.get(batch["status"])
        if final is None:
            return
        if not self.batches.move(bid, (batch["status"],), final, output_file_id=output, error_file_id=errors):
            for f in (output, errors):  # the batch moved on meanwhile (a cancel): these files are not its
                if f:
                    self.files.delete(f)

    async def request(self, endpoint: str, line: Line) -> tuple[bool, dict]:
        """One line run as its HTTP request would be: (succeeded?, the output or error file's line)."""
        if line.error is not None:
            code, message = line.error
            return False, {"id": new_id("batch_req", "_"), "custom_id": line.custom_id, "response": None,
                           "error": {"code": code, "message": message}}  # fmt: skip
        model_type, handle = self.execute[endpoint]
        model = line.body.get("model") if isinstance(line.body, dict) else None
        record = RequestRecord(self.metrics, model=model if isinstance(model, str) else "")
        while True:
            status, body = 200, None
            try:
                req = model_type.model_validate(line.body)
                if getattr(req, "stream", False):
                    raise InvalidRequestError(
                        "stream is not supported in a batch; omit it or set it to false.", "stream"
                    )
                with request_scope(record), in_batch():
                    body = (await handle(req)).model_dump(mode="json")
            except ValidationError as e:
                status, body = 400, validation_error(e.errors())
            except FundamentError as e:
                if e.status_code in (429, 503):  # for now: the same request goes again shortly
                    await asyncio.sleep(RETRY_S)
                    continue
                status, body = e.status_code, e.to_dict()
            except Exception as e:  # noqa: BLE001 - one request's failure is its line's, not the batch's
                log.exception("batch request %s", line.custom_id)
                status, body = 500, {"error": {"message": f"{type(e).__name__}: {e}", "type": "server_error",
                                               "param": None, "code": None}}  # fmt: skip
            break
        if self.metrics is not None:
            self.metrics.requests.labels("/v1/batches", record.model, str(status)).inc()
        line_out = {
            "id": new_id("batch_req", "_"),
            "custom_id": line.custom_id,
            "response": {"status_code": status, "request_id": new_id("req", "_"), "body": body},
            "error": None,
        }
        return 200 <= status < 300, line_out
