"""The Batches API's wire types, as OpenAI defines them (docs/api.md lists what differs)."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, Field, field_validator

from .protocol import RequestBody

BATCH_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/classifications")


class CreateBatchRequest(RequestBody):
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: Optional[dict[str, str]] = None
    output_expires_after: Optional[dict[str, Any]] = None  # accepted; output files are kept until deleted

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict | None) -> dict | None:
        if v is not None and (len(v) > 16 or any(len(k) > 64 or len(x) > 512 for k, x in v.items())):
            raise ValueError("at most 16 keys, keys of at most 64 characters and values of at most 512")
        return v


class BatchError(BaseModel):
    code: Optional[str] = None
    message: Optional[str] = None
    param: Optional[str] = None
    line: Optional[int] = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError] = Field(default_factory=list)


class BatchRequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class Batch(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: Optional[BatchErrors] = None
    input_file_id: str
    completion_window: str
    status: str
    output_file_id: Optional[str] = None
    error_file_id: Optional[str] = None
    created_at: int
    in_progress_at: Optional[int] = None
    expires_at: Optional[int] = None
    finalizing_at: Optional[int] = None
    completed_at: Optional[int] = None
    failed_at: Optional[int] = None
    expired_at: Optional[int] = None
    cancelling_at: Optional[int] = None
    cancelled_at: Optional[int] = None
    request_counts: BatchRequestCounts
    metadata: Optional[dict[str, str]] = None


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Batch]
    first_id: Optional[str] = None
    last_id: Optional[str] = None
    has_more: bool


def batch_object(row: dict) -> Batch:
    keys = set(Batch.model_fields) - {"object", "errors", "request_counts"}
    return Batch(
        **{k: row[k] for k in keys if k in row},
        errors=BatchErrors(data=[BatchError(**e) for e in row["errors"]]) if row.get("errors") else None,
        request_counts=BatchRequestCounts(total=row["total"], completed=row["completed"], failed=row["failed"]),
    )
