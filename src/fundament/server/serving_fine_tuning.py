"""The Fine-tuning jobs API: create (checks what can be checked at once), list, retrieve, cancel,
pause, resume, events, checkpoints. Jobs are rows in the JobStore; the worker process trains them."""

from __future__ import annotations

import random
from pathlib import Path

from ..adapt.hyperparameters import TuneConfig, resolve_hyperparameters
from ..adapt.trainer import check_targets
from ..config import fundament_home
from ..errors import InvalidRequestError, ModelNotFoundError, NotFoundError
from ..jobs import lifecycle
from ..jobs.files import FileStore
from ..jobs.job_data import drop_job_files, keep_job_files
from ..jobs.naming import ORGANIZATION_ID
from ..jobs.store import new_id
from ..models.loading import hf_dir_for
from ..registry import ModelRegistry
from .limits import check_limit
from .protocol_fine_tuning import (
    CheckpointMetrics,
    CreateFineTuningJobRequest,
    FineTuningJob,
    FineTuningJobCheckpoint,
    FineTuningJobCheckpointList,
    FineTuningJobError,
    FineTuningJobEvent,
    FineTuningJobEventList,
    FineTuningJobList,
    JobHyperparameters,
    JobMethod,
    JobSupervisedMethod,
)


def job_object(row: dict) -> FineTuningJob:
    hp = JobHyperparameters(**row["hyperparameters"])
    return FineTuningJob(
        id=row["id"],
        created_at=row["created_at"],
        error=FineTuningJobError(**row["error"]) if row["error"] else None,
        fine_tuned_model=row["fine_tuned_model"],
        finished_at=row["finished_at"],
        hyperparameters=hp,
        model=row["model"],
        organization_id=ORGANIZATION_ID,
        result_files=row["result_files"],
        seed=row["seed"],
        status=row["status"],
        trained_tokens=row["trained_tokens"],
        training_file=row["training_file"],
        validation_file=row["validation_file"],
        estimated_finish=row["estimated_finish"],
        integrations=[],
        metadata=row["metadata"],
        method=JobMethod(type="supervised", supervised=JobSupervisedMethod(hyperparameters=hp)),
    )


class FineTuningHandler:
    def __init__(self, registry: ModelRegistry, files: FileStore, out_root: Path | None = None):
        self.registry, self.files, self.store = registry, files, files.store
        self.out_root = out_root or fundament_home() / "fine_tuning"

    # ---- create --------------------------------------------------------------------------------

    def _base_model(self, name: str) -> str:
        reg = self.registry
        key = reg.canonical(name)
        if key in reg.generators:
            return key
        if key in reg.embedders:
            raise InvalidRequestError(
                f"'{name}' is an embedding model; it cannot be fine-tuned. Fine-tune a generation model such as {next(iter(reg.generators), 'smollm2-135m-instruct')}.",
                "model",
            )
        if key in reg.adapters or reg.is_fine_tuned(key):
            raise InvalidRequestError(
                f"'{name}' is itself a fine-tuned model; fine-tuning it again is not supported yet. Fine-tune its base model.",
                "model",
            )
        raise ModelNotFoundError(name)

    def _training_file(self, file_id: str | None, param: str) -> dict | None:
        if file_id is None:
            return None
        row = self.store.get_file(file_id)
        if row is None:
            raise InvalidRequestError(
                f"invalid {param}: no file with id {file_id!r}. Upload it with POST /v1/files first.", param
            )
        if row["purpose"] != "fine-tune":
            raise InvalidRequestError(
                f"invalid {param}: {file_id} was uploaded with purpose {row['purpose']!r}; fine-tuning needs purpose 'fine-tune'.",
                param,
            )
        return row

    def create(self, req: CreateFineTuningJobRequest) -> FineTuningJob:
        base = self._base_model(req.model)
        self._training_file(req.training_file, "training_file")
        self._training_file(req.validation_file, "validation_file")
        if req.integrations:
            raise InvalidRequestError(
                "integrations (Weights & Biases) are not supported: fundament runs offline. The job's events and result file hold its metrics.",
                "integrations",
            )
        if req.method is not None and req.method.type != "supervised":
            raise InvalidRequestError(
                f"method type {req.method.type!r} is not supported; use 'supervised'.", "method.type"
            )
        supervised = req.method.supervised if req.method is not None else None
        in_method = supervised.hyperparameters if supervised is not None else None
        if in_method is not None and req.hyperparameters is not None:
            raise InvalidRequestError(
                "Give hyperparameters once, in method.supervised.hyperparameters (the top-level field is deprecated).",
                "hyperparameters",
            )
        hp = in_method if in_method is not None else req.hyperparameters
        requested = (
            hp.model_dump()
            if hp is not None
            else {"batch_size": "auto", "learning_rate_multiplier": "auto", "n_epochs": "auto"}
        )
        prefix = "method.supervised." if in_method else ""
        seed = req.seed if req.seed is not None else random.randrange(2**31)
        extensions = req.extensions()
        served = self.registry.generators[base].spec.vllm
        rank = extensions.get("lora_r", TuneConfig.lora_r)
        if served is not None and isinstance(rank, int) and rank > served.max_lora_rank:
            raise InvalidRequestError(  # it would train, then vLLM could not serve it
                f"lora_r {rank} is more than the {served.max_lora_rank} that '{base}' is served with on vLLM "
                "(vllm.max_lora_rank). Use a smaller rank or raise that setting.",
                "lora_r",
            )
        # The job's own copy of its files, before its row exists: from here on it never reads the
        # uploaded files, so deleting them (as OpenAI allows) cannot hurt it.
        job_id = new_id("ftjob")
        out_dir = self.out_root / job_id
        file_ids = {"training_file": req.training_file, "validation_file": req.validation_file}
        kept = keep_job_files(self.files, out_dir, file_ids)
        try:
            for param, file_id in file_ids.items():
                if file_id and param not in kept:
                    raise InvalidRequestError(
                        f"invalid {param}: {file_id} was deleted while the job was being created. Upload it again.",
                        param,
                    )
            # Resolve now (with the file's line count standing in for its example count) so that
            # bad values are a 400 here, not a failed job later.
            with open(kept["training_file"], "rb") as f:
                n_lines = sum(1 for line in f if line.strip())
            self._resolve(requested, max(n_lines, 1), extensions, seed, prefix)
            if "target_modules" in extensions:  # names the model may lack: GPT-2's are its own
                check_targets(hf_dir_for(self.registry.generators[base].spec), extensions["target_modules"])
            row = self.store.create_job(
                model=req.model,
                base_model=base,
                training_file=req.training_file,
                validation_file=req.validation_file,
                suffix=req.suffix,
                seed=seed,
                metadata=req.metadata,
                hyperparameters=requested,
                extensions=extensions,
                out_root=self.out_root,
                job_id=job_id,
            )
        except BaseException:
            drop_job_files(out_dir)
            raise
        return job_object(row)

    @staticmethod
    def _resolve(requested: dict, n_examples: int, extensions: dict, seed: int, prefix: str) -> None:
        """resolve_hyperparameters' 400, its `param` named as the request named the field."""
        try:
            resolve_hyperparameters(requested, n_examples, extensions, seed=seed)
        except InvalidRequestError as e:
            param = e.param or ""
            param = (
                prefix + param
                if param.startswith("hyperparameters")
                else ("training_type" if param == "method" else param)
            )
            raise InvalidRequestError(
                prefix + e.message if e.message.startswith("hyperparameters.") else e.message, param or None
            ) from None

    # ---- read ----------------------------------------------------------------------------------

    def get_row(self, job_id: str) -> dict:
        row = self.store.get_job(job_id)
        if row is None:
            raise NotFoundError(f"No fine-tuning job with id {job_id!r}.", "fine_tuning_job_id")
        return row

    def retrieve(self, job_id: str) -> FineTuningJob:
        return job_object(self.get_row(job_id))

    def list(self, after: str | None, limit: int, metadata: dict[str, str], null_metadata: bool) -> FineTuningJobList:
        check_limit(limit, 100)
        rows, more = self.store.list_jobs(after, limit, metadata, null_metadata)
        return FineTuningJobList(data=[job_object(r) for r in rows], has_more=more)

    def events(self, job_id: str, after: str | None, limit: int) -> FineTuningJobEventList:
        self.get_row(job_id)
        check_limit(limit, 1000)
        rows, more = self.store.list_events(job_id, after, limit)
        data = [
            FineTuningJobEvent(
                id=r["id"],
                created_at=r["created_at"],
                level=r["level"],
                message=r["message"],
                data=r["data"],
                type=r["type"],
            )
            for r in rows
        ]
        return FineTuningJobEventList(data=data, has_more=more)

    def checkpoints(self, job_id: str, after: str | None, limit: int) -> FineTuningJobCheckpointList:
        self.get_row(job_id)
        check_limit(limit, 100)
        rows, more = self.store.list_checkpoints(job_id, after, limit)
        data = [
            FineTuningJobCheckpoint(
                id=r["id"],
                created_at=r["created_at"],
                fine_tuned_model_checkpoint=r["model_id"],
                fine_tuning_job_id=job_id,
                metrics=CheckpointMetrics(**r["metrics"]),
                step_number=r["step_number"],
            )
            for r in rows
        ]
        return FineTuningJobCheckpointList(
            data=data, has_more=more, first_id=data[0].id if data else None, last_id=data[-1].id if data else None
        )

    # ---- state changes -------------------------------------------------------------------------

    def _move(self, job_id: str, verb: str, transition) -> FineTuningJob:
        """A transition the client asked for; a 400 naming the job's status when the table refuses it."""
        self.get_row(job_id)
        if not transition(self.store, job_id):
            status, sources = self.get_row(job_id)["status"], lifecycle.TRANSITIONS[verb].sources
            raise InvalidRequestError(
                f"Cannot {verb} the job {job_id}: it is {status}; only a job that is {' or '.join(sources)} can be.",
                "fine_tuning_job_id",
            )
        return job_object(self.get_row(job_id))

    def cancel(self, job_id: str) -> FineTuningJob:
        return self._move(job_id, "cancel", lifecycle.cancel)

    def pause(self, job_id: str) -> FineTuningJob:
        return self._move(job_id, "pause", lifecycle.pause)

    def resume(self, job_id: str) -> FineTuningJob:
        return self._move(job_id, "resume", lifecycle.resume)
