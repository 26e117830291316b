"""The OpenAPI schema as the server really behaves: FastAPI's generated one, corrected.

FastAPI documents a 422 for every validated route; this server answers bad input with a 400 in
OpenAI's error envelope. Here each operation lists the statuses it can send (400, 401 with API
keys, 404, 413 over the body limit, 429 when the engine's queue is full, 503 while shutting
down), every error with its schema, the event stream beside the JSON answer, the multipart
upload, and the enforced limits. Knows the app's routes and the config; nothing of models.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from ..config import ServeConfig
from ..server.protocol import ErrorResponse

ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
_WHY = {
    "400": "Invalid request: the error's `param` names the field and the message says what to fix.",
    "401": "Missing or wrong API key (only when the server was started with API keys).",
    "404": "No such model, file or job, or no such route.",
    "413": "The request body is over the server's limit ({limit} bytes).",
    "429": "The engine's queue is full; retry after the `retry-after` header's seconds.",
    "503": "The server is shutting down; the request was stopped. Retry it.",
}
GENERATION = {"/v1/chat/completions", "/v1/completions", "/v1/classifications"}
STREAMS = {"/v1/chat/completions", "/v1/completions"}


def _error(status: str, limit: int) -> dict:
    return {"description": _WHY[status].format(limit=limit), "content": {"application/json": {"schema": ERROR_REF}}}


NAMES_A_MODEL = GENERATION | {"/v1/embeddings", "/v1/fine_tuning/jobs"}  # POST bodies with `model`


def _statuses(path: str, method: str, op: dict) -> list[str]:
    """The error statuses one operation can answer with."""
    out = ["400"] if op.get("parameters") or op.get("requestBody") or method == "post" else []
    if path.startswith("/v1/"):
        out.append("401")
    if "{" in path or (method == "post" and path in NAMES_A_MODEL):
        out.append("404")
    if method == "post":
        out.append("413")
    if path in GENERATION:
        out += ["429", "503"]
    return out


def build_openapi(app: FastAPI, config: ServeConfig) -> dict:
    spec = get_openapi(title=app.title, version=app.version, routes=app.routes, description=__doc__.split("\n\n")[0])
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas["ErrorResponse"] = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, sub in schemas["ErrorResponse"].pop("$defs", {}).items():
        schemas.setdefault(name, sub)
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    # API keys are optional (`fundament serve --api-key`); with them, a bearer token on every /v1 route.
    spec["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            responses = op["responses"]
            if path.startswith("/v1/"):
                op["security"] = [{"bearer": []}, {}]
            responses.pop("422", None)
            limit = config.max_file_bytes if path == "/v1/files" else config.max_body_bytes
            for status in _statuses(path, method, op):
                responses[status] = _error(status, limit)
            if path in STREAMS and method == "post":
                responses["200"].setdefault("content", {})["text/event-stream"] = {
                    # each event, as SSE parsers read it: its `data` a chunk object as JSON, or [DONE]
                    "schema": {
                        "type": "object",
                        "required": ["data"],
                        "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
                        "description": "Server-sent events, one chunk object per `data:` line, then `data: [DONE]`.",
                    }
                }
    return spec


def install(app: FastAPI, config: ServeConfig) -> None:
    """Serve the corrected schema at /openapi.json (built once, on first request)."""
    cached: dict = {}

    def openapi() -> dict:
        if not cached:
            cached.update(build_openapi(app, config))
        return cached

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to replace the schema


def upload_body(max_file_bytes: int) -> dict:
    """POST /v1/files's request body. The route reads the multipart stream itself (the file goes
    to disk as it arrives), so FastAPI cannot infer it."""
    from .protocol_fine_tuning import UPLOAD_PURPOSES

    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file", "purpose"],
                        "properties": {
                            "file": {
                                "type": "string",
                                "format": "binary",
                                "description": f"The file, at most {max_file_bytes} bytes.",
                            },
                            "purpose": {"type": "string", "enum": list(UPLOAD_PURPOSES)},
                        },
                    }
                }
            },
        }
    }
