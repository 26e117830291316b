"""Pydantic wire types of the Files and Fine-tuning APIs, field names and order as OpenAI's.

Our extensions to a fine-tuning job request are fenced under `# --- fundament extensions ---`
and documented in docs/fine-tuning.md.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator

from ..adapt.hyperparameters import RANGES
from .protocol import RequestBody

# ---- files ------------------------------------------------------------------------------------

UPLOAD_PURPOSES = ("fine-tune", "batch", "user_data")


class FileObject(BaseModel):
    id: str
    bytes: int
    created_at: int
    filename: str
    object: Literal["file"] = "file"
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"  # deprecated by OpenAI, still sent
    expires_at: Optional[int] = None
    status_details: Optional[str] = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool
    first_id: Optional[str] = None
    last_id: Optional[str] = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool


# ---- fine-tuning job requests -----------------------------------------------------------------


class Hyperparameters(BaseModel):
    """Each one "auto" or a JSON number (strict: no "3", no true); ranges are checked where they
    are resolved (adapt/hyperparameters.py). An unknown name is refused: a typo must not train with "auto"."""

    model_config = ConfigDict(extra="forbid")

    batch_size: Union[Literal["auto"], StrictInt] = "auto"
    learning_rate_multiplier: Union[Literal["auto"], StrictInt, StrictFloat] = "auto"
    n_epochs: Union[Literal["auto"], StrictInt] = "auto"


def _in_range(name: str):
    """A field whose range (and finiteness: no Infinity or NaN, which JSON parsing lets through)
    is the trainer's own, so the schema states it and a value outside it is a 400 naming the field."""
    _, lo, hi = RANGES[name]
    return Field(None, ge=lo, le=hi, allow_inf_nan=False)


class SupervisedMethod(RequestBody):
    hyperparameters: Optional[Hyperparameters] = None


class Method(RequestBody):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: Optional[SupervisedMethod] = None
    dpo: Optional[Any] = None
    reinforcement: Optional[Any] = None


class CreateFineTuningJobRequest(RequestBody):
    model: str
    training_file: str
    hyperparameters: Optional[Hyperparameters] = None  # deprecated by OpenAI in favour of `method`
    suffix: Optional[str] = Field(None, max_length=64)
    validation_file: Optional[str] = None
    integrations: Optional[list[Any]] = None
    seed: Optional[int] = Field(None, ge=0, le=2**31 - 1)
    method: Optional[Method] = None
    metadata: Optional[dict[str, str]] = None
    # --- fundament extensions (docs/fine-tuning.md); numbers within adapt/hyperparameters.py's RANGES ---
    training_type: Optional[str] = None  # "lora" (the only one for now)
    lora_r: Optional[StrictInt] = _in_range("lora_r")
    lora_alpha: Optional[StrictFloat] = _in_range("lora_alpha")
    lora_dropout: Optional[StrictFloat] = _in_range("lora_dropout")
    target_modules: Optional[list[str]] = None
    warmup_ratio: Optional[StrictFloat] = _in_range("warmup_ratio")
    weight_decay: Optional[StrictFloat] = _in_range("weight_decay")
    eval_every: Optional[StrictInt] = _in_range("eval_every")
    row_tokens: Optional[StrictInt] = _in_range("row_tokens")
    compile: Optional[Union[StrictBool, Literal["auto"]]] = None
    nproc_per_node: Optional[StrictInt] = _in_range("nproc_per_node")
    nnodes: Optional[StrictInt] = _in_range("nnodes")
    distributed: Optional[Literal["ddp", "fsdp"]] = None

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> str | None:
        if v is not None and not all(c.isalnum() or c in "-_." for c in v):
            raise ValueError("use letters, digits, '-', '_' and '.' only (it becomes part of the model id)")
        return v

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict | None) -> dict | None:
        if v is not None:
            if len(v) > 16:
                raise ValueError("at most 16 keys")
            for k, val in v.items():
                if len(k) > 64 or len(val) > 512:
                    raise ValueError("keys are at most 64 characters and values at most 512")
        return v

    def extensions(self) -> dict:
        """Our fenced fields that were set, under the names adapt/hyperparameters.py's TuneConfig uses."""
        names = (
            "lora_r",
            "lora_alpha",
            "lora_dropout",
            "target_modules",
            "warmup_ratio",
            "weight_decay",
            "eval_every",
            "row_tokens",
            "compile",
            "nproc_per_node",
            "nnodes",
            "distributed",
        )
        out = {n: getattr(self, n) for n in names if getattr(self, n) is not None}
        if self.training_type is not None:
            out["method"] = self.training_type
        return out


# ---- fine-tuning job objects ------------------------------------------------------------------


class FineTuningJobError(BaseModel):
    code: str
    message: str
    param: Optional[str] = None


class JobHyperparameters(BaseModel):
    batch_size: Union[Literal["auto"], int, None] = None
    learning_rate_multiplier: Union[Literal["auto"], float, None] = None
    n_epochs: Union[Literal["auto"], int, None] = None


class JobSupervisedMethod(BaseModel):
    hyperparameters: Optional[JobHyperparameters] = None


class JobMethod(BaseModel):
    type: Literal["supervised", "dpo", "reinforcement"] = "supervised"
    supervised: Optional[JobSupervisedMethod] = None


class FineTuningJob(BaseModel):
    id: str
    created_at: int
    error: Optional[FineTuningJobError] = None
    fine_tuned_model: Optional[str] = None
    finished_at: Optional[int] = None
    hyperparameters: JobHyperparameters
    model: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    organization_id: str
    result_files: list[str]
    seed: int
    # OpenAI's statuses, and `paused` (set by POST .../pause, left by POST .../resume)
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled", "paused"]
    trained_tokens: Optional[int] = None
    training_file: str
    validation_file: Optional[str] = None
    estimated_finish: Optional[int] = None
    integrations: Optional[list[Any]] = None
    metadata: Optional[dict[str, str]] = None
    method: Optional[JobMethod] = None


class FineTuningJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool


class FineTuningJobEvent(BaseModel):
    id: str
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    data: Optional[dict[str, Any]] = None
    type: Optional[Literal["message", "metrics"]] = None


class FineTuningJobEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobEvent]
    has_more: bool


class CheckpointMetrics(BaseModel):
    full_valid_loss: Optional[float] = None
    full_valid_mean_token_accuracy: Optional[float] = None
    step: Optional[float] = None
    train_loss: Optional[float] = None
    train_mean_token_accuracy: Optional[float] = None
    valid_loss: Optional[float] = None
    valid_mean_token_accuracy: Optional[float] = None


class FineTuningJobCheckpoint(BaseModel):
    id: str
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: CheckpointMetrics
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    step_number: int


class FineTuningJobCheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobCheckpoint]
    has_more: bool
    first_id: Optional[str] = None
    last_id: Optional[str] = None
