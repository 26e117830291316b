"""The exception tree of fundament; each class maps to one OpenAI error (status, type, code).

    FundamentError                      500 server_error
    ├── InvalidRequestError             400 invalid_request_error   (bad field: `param` names it)
    │   └── ContextLengthExceededError  400 code=context_length_exceeded
    ├── AuthenticationError             401 invalid_api_key
    ├── NotFoundError                   404 (any missing object)
    │   └── ModelNotFoundError          404 code=model_not_found
    ├── PayloadTooLargeError            413 request body over the configured limit
    ├── QueueFullError                  429 the engine's queue is full (with retry-after)
    ├── ServiceUnavailableError         503 the server is shutting down
    └── ConfigError                     500 a config file fundament cannot start with (the CLI
                                            prints one line and exits 2; no request gets it)

Core code raises these; the server's one handler and the CLI format them. Nothing else does.
"""

from __future__ import annotations


class FundamentError(Exception):
    status_code = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequestError(FundamentError):
    status_code = 400
    type = "invalid_request_error"


class ContextLengthExceededError(InvalidRequestError):
    code = "context_length_exceeded"


class AuthenticationError(FundamentError):
    status_code = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class NotFoundError(FundamentError):
    status_code = 404
    type = "invalid_request_error"


class ModelNotFoundError(NotFoundError):
    code = "model_not_found"

    def __init__(self, model: str, param: str | None = "model"):
        super().__init__(f"The model '{model}' does not exist. GET /v1/models lists the models served here.", param)


class PayloadTooLargeError(FundamentError):
    status_code = 413
    type = "invalid_request_error"
    code = "request_too_large"


class QueueFullError(FundamentError):
    status_code = 429
    type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class ServiceUnavailableError(FundamentError):
    status_code = 503
    type = "server_error"
    code = "service_unavailable"


class ConfigError(FundamentError):
    """A setting fundament cannot start with; `param` is its key path in the file (`models[0].path`).
    Not an InvalidRequestError: no request was made, so a 400 would blame a client for the server's file."""


def error_payload(exc: BaseException) -> dict:
    """The OpenAI error envelope for any exception (unknown ones become a generic server_error)."""
    if isinstance(exc, FundamentError):
        return exc.to_dict()
    return {
        "error": {
            "message": f"internal error: {type(exc).__name__}",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }
