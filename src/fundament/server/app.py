"""The FastAPI app: routes (thin: validate, hand off), the one error handler, API keys, body limits."""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import ServeConfig
from ..errors import AuthenticationError, FundamentError, ModelNotFoundError, QueueFullError, error_payload
from ..models.registry import ModelRegistry
from .protocol import ChatCompletionRequest, ClassificationRequest, ClassificationResponse, CompletionRequest, EmbeddingRequest, Model, ModelList
from .serving_classify import ClassificationHandler
from .serving_chat import ChatHandler
from .serving_completions import CompletionHandler
from .serving_embeddings import EmbeddingHandler

log = logging.getLogger(__name__)


_TYPE_NAMES = {"str", "int", "float", "bool", "dict", "list", "none", "literal"}


def _param_from_loc(loc) -> str | None:
    """('body', 'messages', 0, 'role') -> 'messages[0].role'; union-member and tag names are dropped."""
    out = ""
    for p in loc:
        if p == "body" or (isinstance(p, str) and (p in _TYPE_NAMES or any(c in p for c in "[(-"))):
            continue
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


def _describe(value) -> str:
    if isinstance(value, (str, int, float, bool, type(None))):
        return json.dumps(value)[:100]
    return type(value).__name__


def _validation_response(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        msg = f"The request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')}). Send a JSON object."
        param = None
    else:
        param = _param_from_loc(first.get("loc", ()))
        same = [e for e in errors if _param_from_loc(e.get("loc", ())) == param]
        if first.get("type") == "missing":
            msg = f"Missing required parameter: '{param}'."
        elif len(same) > 1:  # a union: none of the accepted shapes matched
            msg = f"Invalid type for '{param}' (got {_describe(first.get('input'))}); see the API reference for the accepted shapes."
        else:
            msg = f"Invalid value for '{param}': {first.get('msg', 'invalid')} (got {_describe(first.get('input'))})."
    return JSONResponse({"error": {"message": msg, "type": "invalid_request_error", "param": param, "code": None}}, status_code=400)


class BodyLimitMiddleware:
    """Refuses request bodies over the limit with a 413 before they are read into memory."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._too_large(send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge()
            return msg

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await self._too_large(send)

    async def _too_large(self, send):
        body = json.dumps(
            {"error": {"message": f"The request body is larger than the server's limit of {self.max_bytes} bytes.", "type": "invalid_request_error", "param": None, "code": "request_too_large"}}
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


def create_app(config: ServeConfig, registry: ModelRegistry | None = None) -> FastAPI:
    """The app; it loads the configured models at startup unless a loaded registry is passed in."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        reg = app.state.registry
        if not (reg.generators or reg.embedders):
            await asyncio.to_thread(reg.load_all)
        reg.start()
        yield
        reg.stop()

    app = FastAPI(title="fundament", version="0.1.0", lifespan=lifespan)
    app.state.registry = registry or ModelRegistry(config)
    reg = app.state.registry
    chat, completions, embeddings = ChatHandler(reg), CompletionHandler(reg), EmbeddingHandler(reg)
    classifications = ClassificationHandler(reg)
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)

    @app.exception_handler(FundamentError)
    async def _fundament_error(request, exc: FundamentError):
        headers = {"retry-after": str(int(exc.retry_after))} if isinstance(exc, QueueFullError) else None
        return JSONResponse(exc.to_dict(), status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):
        return _validation_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        msg = f"Unknown request URL: {request.method} {request.url.path}." if exc.status_code == 404 else str(exc.detail)
        return JSONResponse({"error": {"message": msg, "type": "invalid_request_error", "param": None, "code": None}}, status_code=exc.status_code)

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
                "Incorrect API key provided." if token else "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'."
            )

    v1 = [Depends(check_key)]

    @app.get("/health")
    async def health():
        engines = {n: {"running": len(g.engine.running), "waiting": len(g.engine.waiting), "steps": g.engine.steps} for n, g in reg.generators.items()}
        return {"status": "ok", "engines": engines}

    @app.get("/v1/models", dependencies=v1)
    async def list_models() -> ModelList:
        return ModelList(data=[Model(id=i, created=c, owned_by="fundament") for i, c in reg.model_ids()])

    @app.get("/v1/models/{model_id:path}", dependencies=v1)
    async def get_model(model_id: str) -> Model:
        for i, c in reg.model_ids():
            if i == model_id:
                return Model(id=i, created=c, owned_by="fundament")
        raise ModelNotFoundError(model_id)

    @app.post("/v1/chat/completions", dependencies=v1)
    async def create_chat_completion(body: ChatCompletionRequest, request: Request):
        if body.stream:
            return StreamingResponse(chat.stream(body), media_type="text/event-stream")
        return await _until_disconnect(request, chat.create(body))

    @app.post("/v1/completions", dependencies=v1)
    async def create_completion(body: CompletionRequest, request: Request):
        if body.stream:
            return StreamingResponse(completions.stream(body), media_type="text/event-stream")
        return await _until_disconnect(request, completions.create(body))

    @app.post("/v1/classifications", dependencies=v1)
    async def create_classification(body: ClassificationRequest) -> ClassificationResponse:
        return await classifications.create(body)

    @app.post("/v1/embeddings", dependencies=v1)
    async def create_embedding(body: EmbeddingRequest):
        return await embeddings.create(body)
    return app
