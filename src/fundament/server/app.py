"""The FastAPI app: routes (thin: validate, hand off), the one error handler, API keys, body limits."""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import ServeConfig
from ..errors import AuthenticationError, FundamentError, ModelNotFoundError, QueueFullError, error_payload
from ..jobs.batches import BatchStore
from ..jobs.files import FileStore
from ..jobs.store import JobStore
from ..registry import ModelRegistry
from . import openapi
from .metrics import RequestMetricsMiddleware, RequestRecord, ServerMetrics
from .metrics import current as current_request
from .protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    ClassificationRequest,
    ClassificationResponse,
    Completion,
    CompletionRequest,
    CreateEmbeddingResponse,
    EmbeddingRequest,
    Model,
    ModelList,
)
from .protocol_batches import Batch, BatchList, CreateBatchRequest
from .protocol_fine_tuning import (
    CreateFineTuningJobRequest,
    FileDeleted,
    FileList,
    FileObject,
    FineTuningJob,
    FineTuningJobCheckpointList,
    FineTuningJobEventList,
    FineTuningJobList,
    ModelDeleted,
)
from .serving_batches import BatchHandler, BatchRunner, Execute
from .serving_chat import ChatHandler
from .serving_classify import ClassificationHandler
from .serving_completions import CompletionHandler
from .serving_embeddings import EmbeddingHandler
from .serving_files import FilesHandler
from .serving_fine_tuning import FineTuningHandler
from .validation import validation_error

log = logging.getLogger(__name__)


class BodyLimitMiddleware:
    """Refuses request bodies over the limit with a 413 before they are read into memory.
    `path_limits` gives some paths (file uploads) their own limit: {path: (bytes, param)}."""

    def __init__(self, app, max_bytes: int, path_limits: dict[str, tuple[int, str]] | None = None):
        self.app, self.max_bytes, self.path_limits = app, max_bytes, path_limits or {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit, param = self.path_limits.get(scope.get("path", ""), (self.max_bytes, None))
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await self._too_large(send, limit, param)
        seen, over = 0, False

        async def limited_receive():
            nonlocal seen, over
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    over = True
                    raise _TooLarge()
            return msg

        async def guarded_send(msg):
            # A body cut off at the limit may reach the app as a parse error (FastAPI turns any
            # exception while reading it into a 400); the answer to that is this 413, not the 400.
            if not over:
                await send(msg)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _TooLarge:
            pass
        if over:
            await self._too_large(send, limit, param)

    async def _too_large(self, send, limit: int, param: str | None):
        body = json.dumps(
            {
                "error": {
                    "message": f"The request body is larger than the server's limit of {limit} bytes.",
                    "type": "invalid_request_error",
                    "param": param,
                    "code": "request_too_large",
                }
            }
        ).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


async def _until_disconnect(request: Request, coro):
    """Run a non-streaming generation, cancelling it (and so freeing its engine work) if the client goes away."""
    task = asyncio.ensure_future(coro)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            raise asyncio.CancelledError()


async def _sync_fine_tuned(reg: ModelRegistry, every_s: float = 1.0) -> None:
    """Fine-tuned models of vLLM-served bases are loaded into vLLM as their jobs succeed."""
    while True:
        try:
            await asyncio.to_thread(reg.sync_fine_tuned)
        except Exception:
            log.exception("loading fine-tuned models into vLLM failed")
        await asyncio.sleep(every_s)


def _asked(model: str) -> RequestRecord | None:
    """Name the model this request asked for in its metrics record and log line."""
    record = current_request()
    if record is not None:
        record.model = model
    return record


def create_app(config: ServeConfig, registry: ModelRegistry | None = None, worker=None) -> FastAPI:
    """The app; it loads the configured models at startup unless a loaded registry is passed in.
    `worker` (a jobs.supervisor.WorkerProcess) is started and stopped with the app."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        reg = app.state.registry
        if not (reg.generators or reg.embedders):
            await asyncio.to_thread(reg.load_all)
        app.state.files.sweep()  # what a killed process may have left half-written
        reg.start()
        worker = app.state.worker
        if worker is not None:
            worker.start()
        sync = asyncio.create_task(_sync_fine_tuned(reg)) if reg.serves_vllm() else None
        batch_runner.wake = batches.wake = asyncio.Event()  # this loop's
        running_batches = asyncio.create_task(batch_runner.run())
        yield
        running_batches.cancel()  # a request cut off here has no result yet: it runs again after a restart
        if sync is not None:
            sync.cancel()
        if worker is not None:  # here, not after uvicorn returns: it re-raises SIGTERM on its way out
            await asyncio.to_thread(worker.stop)
        reg.stop()

    app = FastAPI(title="fundament", version="0.1.0", lifespan=lifespan)
    app.state.registry = registry or ModelRegistry(config)
    app.state.worker = worker
    reg = app.state.registry
    store = JobStore()
    app.state.files = file_store = FileStore(store, max_bytes=config.max_file_bytes)
    if reg.fine_tuned is None:
        reg.fine_tuned = store  # ft: models are served the moment their job succeeds
    chat, completions, embeddings = ChatHandler(reg), CompletionHandler(reg), EmbeddingHandler(reg)
    classifications = ClassificationHandler(reg)
    files, fine_tuning = FilesHandler(file_store), FineTuningHandler(reg, file_store)
    batch_store = BatchStore(store)
    batches = BatchHandler(batch_store, file_store)
    execute: Execute = {
        "/v1/chat/completions": (ChatCompletionRequest, chat.create),
        "/v1/completions": (CompletionRequest, completions.create),
        "/v1/embeddings": (EmbeddingRequest, embeddings.create),
        "/v1/classifications": (ClassificationRequest, classifications.create),
    }
    # a multipart upload carries a little framing around the file; FileStore enforces the exact size
    upload_limit = (config.max_file_bytes + 64 * 1024, "file")
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes, path_limits={"/v1/files": upload_limit})
    app.state.metrics = metrics = ServerMetrics(reg, store)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)  # outermost: it sees the 413s too
    # a batch keeps at most half the engine's batch slots: interactive requests always find room
    batch_runner = BatchRunner(batch_store, file_store, execute, config.engine.max_num_seqs // 2, metrics)

    @app.exception_handler(FundamentError)
    async def _fundament_error(request, exc: FundamentError):
        headers = {"retry-after": str(int(exc.retry_after))} if isinstance(exc, QueueFullError) else None
        return JSONResponse(exc.to_dict(), status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):
        return JSONResponse(validation_error(exc.errors()), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        msg = (
            f"Unknown request URL: {request.method} {request.url.path}." if exc.status_code == 404 else str(exc.detail)
        )
        if exc.status_code == 405:
            msg = f"{request.method} is not allowed on {request.url.path}; allowed: {(exc.headers or {}).get('Allow', 'none')}."
        # exc.headers carries a 405's Allow header
        return JSONResponse(
            {"error": {"message": msg, "type": "invalid_request_error", "param": None, "code": None}},
            status_code=exc.status_code,
            headers=exc.headers,
        )

    @app.exception_handler(Exception)
    async def _unexpected(request, exc):
        log.exception("unhandled error")
        return JSONResponse(error_payload(exc), status_code=500)

    keys = set(config.api_keys)

    async def check_key(request: Request):
        if not keys:
            return
        auth = request.headers.get("authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else ""
        if token not in keys:
            raise AuthenticationError(
                "Incorrect API key provided."
                if token
                else "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'."
            )

    v1 = [Depends(check_key)]

    @app.get("/health")
    async def health():
        engines = {n: g.engine.health() for n, g in reg.generators.items()}
        return {"status": "ok", "engines": engines}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics():
        """Prometheus' text format; unauthenticated, as vLLM's and /health are."""
        body = await asyncio.to_thread(metrics.exposition)  # the job gauges read SQLite
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=v1)
    async def list_models() -> ModelList:
        return ModelList(data=[Model(id=i, created=c, owned_by="fundament") for i, c in reg.model_ids()])

    @app.get("/v1/models/{model_id:path}", dependencies=v1)
    async def get_model(model_id: str) -> Model:
        for i, c in reg.model_ids():
            if i == model_id:
                return Model(id=i, created=c, owned_by="fundament")
        raise ModelNotFoundError(model_id)

    @app.post("/v1/chat/completions", dependencies=v1, response_model=ChatCompletion)
    async def create_chat_completion(body: ChatCompletionRequest, request: Request):
        _asked(body.model)
        if body.stream:
            return StreamingResponse(chat.stream(body), media_type="text/event-stream")
        return await _until_disconnect(request, chat.create(body))

    @app.post("/v1/completions", dependencies=v1, response_model=Completion)
    async def create_completion(body: CompletionRequest, request: Request):
        _asked(body.model)
        if body.stream:
            return StreamingResponse(completions.stream(body), media_type="text/event-stream")
        return await _until_disconnect(request, completions.create(body))

    @app.post("/v1/classifications", dependencies=v1)
    async def create_classification(body: ClassificationRequest, request: Request) -> ClassificationResponse:
        _asked(body.model)
        return await _until_disconnect(request, classifications.create(body))

    @app.post("/v1/embeddings", dependencies=v1, response_model=CreateEmbeddingResponse)
    async def create_embedding(body: EmbeddingRequest, request: Request):
        record = _asked(body.model)
        out = await _until_disconnect(request, embeddings.create(body))
        if record is not None and hasattr(out, "usage"):
            record.prompt_tokens += out.usage.prompt_tokens
            metrics.prompt_tokens.labels(body.model).inc(out.usage.prompt_tokens)
        return out

    @app.delete("/v1/models/{model_id:path}", dependencies=v1)
    def delete_model(model_id: str) -> ModelDeleted:
        return ModelDeleted(id=reg.delete_model(model_id), deleted=True)

    # ---- files (sync handlers run in the thread pool: SQLite and disk never block the loop) ----

    @app.post("/v1/files", dependencies=v1, openapi_extra=openapi.upload_body(config.max_file_bytes))
    async def create_file(request: Request) -> FileObject:
        return await files.create(request)

    @app.get("/v1/files", dependencies=v1)
    def list_files(
        after: str | None = None,
        limit: int = Query(10000, ge=1, le=10000),
        order: Literal["asc", "desc"] = "desc",
        purpose: str | None = None,
    ) -> FileList:
        return files.list(after, limit, order, purpose)

    @app.get("/v1/files/{file_id}", dependencies=v1)
    def retrieve_file(file_id: str) -> FileObject:
        return files.retrieve(file_id)

    @app.get(
        "/v1/files/{file_id}/content",
        dependencies=v1,
        response_class=FileResponse,
        responses={
            200: {
                "description": "The file's bytes.",
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            }
        },
    )
    def file_content(file_id: str) -> FileResponse:
        return files.content(file_id)

    @app.delete("/v1/files/{file_id}", dependencies=v1)
    def delete_file(file_id: str) -> FileDeleted:
        return files.delete(file_id)

    # ---- fine-tuning jobs ----------------------------------------------------------------------

    @app.post("/v1/fine_tuning/jobs", dependencies=v1)
    def create_fine_tuning_job(body: CreateFineTuningJobRequest) -> FineTuningJob:
        return fine_tuning.create(body)

    @app.post("/v1/batches", dependencies=v1)
    async def create_batch(body: CreateBatchRequest) -> Batch:  # async: it wakes the runner in this loop
        return batches.create(body)

    @app.get("/v1/batches", dependencies=v1)
    def list_batches(after: str | None = None, limit: int = Query(20, ge=1, le=100)) -> BatchList:
        return batches.list(after, limit)

    @app.get("/v1/batches/{batch_id}", dependencies=v1)
    def retrieve_batch(batch_id: str) -> Batch:
        return batches.retrieve(batch_id)

    @app.post("/v1/batches/{batch_id}/cancel", dependencies=v1)
    async def cancel_batch(batch_id: str) -> Batch:
        return batches.cancel(batch_id)

    @app.get("/v1/fine_tuning/jobs", dependencies=v1)
    def list_fine_tuning_jobs(
        request: Request, after: str | None = None, limit: int = Query(20, ge=1, le=100)
    ) -> FineTuningJobList:
        q = request.query_params
        metadata = {
            k[len("metadata[") : -1]: v for k, v in q.multi_items() if k.startswith("metadata[") and k.endswith("]")
        }
        return fine_tuning.list(after, limit, metadata, q.get("metadata") == "null")

    @app.get("/v1/fine_tuning/jobs/{job_id}", dependencies=v1)
    def retrieve_fine_tuning_job(job_id: str) -> FineTuningJob:
        return fine_tuning.retrieve(job_id)

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel", dependencies=v1)
    def cancel_fine_tuning_job(job_id: str) -> FineTuningJob:
        return fine_tuning.cancel(job_id)

    @app.post("/v1/fine_tuning/jobs/{job_id}/pause", dependencies=v1)
    def pause_fine_tuning_job(job_id: str) -> FineTuningJob:
        return fine_tuning.pause(job_id)

    @app.post("/v1/fine_tuning/jobs/{job_id}/resume", dependencies=v1)
    def resume_fine_tuning_job(job_id: str) -> FineTuningJob:
        return fine_tuning.resume(job_id)

    @app.get("/v1/fine_tuning/jobs/{job_id}/events", dependencies=v1)
    def list_fine_tuning_events(
        job_id: str, after: str | None = None, limit: int = Query(20, ge=1, le=1000)
    ) -> FineTuningJobEventList:
        return fine_tuning.events(job_id, after, limit)

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints", dependencies=v1)
    def list_fine_tuning_checkpoints(
        job_id: str, after: str | None = None, limit: int = Query(10, ge=1, le=100)
    ) -> FineTuningJobCheckpointList:
        return fine_tuning.checkpoints(job_id, after, limit)

    openapi.install(app, config)
    return app
