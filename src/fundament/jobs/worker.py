"""The worker process: validates, queues and trains fine-tuning jobs held in the JobStore.

`python -m fundament.jobs.worker --config serve.yaml` (or `fundament worker`). One job trains at a
time. The job it trains carries its heartbeat; a job left `running` by a worker that died is queued
again and the trainer resumes it from its saved state. Cancel, pause and shutdown are read between
training steps. The training itself is adapt/tune.py's and every status change jobs/lifecycle.py's;
this file only runs the loop. A job of several processes trains under torchrun (jobs/launch.py).
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from ..adapt.examples import encode_example
from ..adapt.hyperparameters import PLACEMENT, TuneConfig, resolve_hyperparameters
from ..adapt.tune import TuneHooks, fine_tune, latest_checkpoint
from ..config import ModelSpec, ServeConfig
from ..errors import FundamentError, InvalidRequestError
from . import lifecycle
from .files import FileStore
from .job_data import data_path, drop_job_files, keep_job_files
from .launch import TorchrunJob
from .lifecycle import FINISHED, Status
from .naming import checkpoint_model_id, fine_tuned_model_id
from .store import JobStore, worker_identity
from .validation import MIN_TRAINING_EXAMPLES, Dataset, validate_file

log = logging.getLogger(__name__)

HEARTBEAT_S = 2.0
STALE_S = 30.0  # a running job whose heartbeat is older than this has lost its worker
MAX_EVENTS_PER_FILE = 100  # validation problems written as events, per file


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:  # a killed child its parent has not reaped yet is still in the table, as a zombie
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _current(store: JobStore, job_id: str) -> dict:
    """A job's row as it is now."""
    row = store.get_job(job_id)
    assert row is not None, f"job {job_id} has no row"  # rows of jobs are never deleted
    return row


def worker_is_dead(job: dict) -> bool:
    host = (job["worker"] or "").partition(":")[0]
    return host == socket.gethostname() and job["worker_pid"] is not None and _pid_gone(job["worker_pid"])


class JobHooks(TuneHooks):
    """The trainer's hooks for one job: events, checkpoints, estimated finish, stop requests."""

    def __init__(self, worker: Worker, job: dict):
        self.worker, self.store, self.job = worker, worker.store, job
        self.model_id = fine_tuned_model_id(job)
        self.t0 = time.monotonic()
        self.first_step: int | None = None
        self.pending_checkpoint: tuple[int, Path] | None = None
        self.last_step, self.total_steps = 0, 0

    def on_step(self, step: int, total_steps: int, metrics: dict) -> None:
        jid = self.job["id"]
        if self.first_step is None:
            self.first_step = step
            if step > 1:
                self.store.add_event(jid, f"Resumed from the state saved at step {step - 1}.")
        self.last_step, self.total_steps = step, total_steps
        data = {
            "step": step,
            "total_steps": total_steps,
            "train_loss": metrics.get("train_loss"),
            "train_mean_token_accuracy": metrics.get("train_mean_token_accuracy"),
            "valid_loss": metrics.get("valid_loss"),
            "valid_mean_token_accuracy": metrics.get("valid_mean_token_accuracy"),
            "trained_tokens": metrics.get("tokens"),
            "world_size": metrics.get("world_size", 1),
            "tokens_per_second": metrics.get("tokens_per_second"),  # summed over the ranks
            "grad_norm": metrics.get("grad_norm"),
        }
        msg = f"Step {step}/{total_steps}: training loss={data['train_loss']:.4f}"
        if data["valid_loss"] is not None:
            msg += f", validation loss={data['valid_loss']:.4f}"
        self.store.add_event(jid, msg, type="metrics", data=data)
        per_step = (time.monotonic() - self.t0) / (step - self.first_step + 1)
        self.store.update_job(
            jid, (Status.RUNNING,), estimated_finish=int(time.time() + per_step * (total_steps - step))
        )
        if self.pending_checkpoint and self.pending_checkpoint[0] == step:
            self.record_checkpoint(data)

    def on_message(self, message: str) -> None:
        self.store.add_event(self.job["id"], message)

    def on_checkpoint(self, step: int, path: Path) -> None:
        # The trainer calls this just before on_step of the same step: keep it until its metrics come.
        self.pending_checkpoint = (step, Path(path))

    def record_checkpoint(self, data: dict) -> None:
        """Record the pending checkpoint, if any, with the metrics known (from `data`)."""
        if self.pending_checkpoint is None:
            return
        step, path = self.pending_checkpoint
        self.pending_checkpoint = None
        metrics = {
            k: data[k]
            for k in ("train_loss", "train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy")
            if data.get(k) is not None
        }
        self.store.add_checkpoint(
            self.job["id"], step, {"step": step, **metrics}, checkpoint_model_id(self.model_id, step), path
        )

    def should_stop(self) -> str | None:
        if self.worker.stopping.is_set():
            return "pause"
        row = _current(self.store, self.job["id"])
        if row["status"] == Status.CANCELLED:
            return "cancel"
        if row["status"] != Status.RUNNING or row["worker"] != self.worker.identity:
            return "pause"  # paused, or taken from us: stop and leave the job as it is now
        return None


class Worker:
    def __init__(
        self,
        config: ServeConfig,
        store: JobStore | None = None,
        files: FileStore | None = None,
        parent_pid: int | None = None,
        poll_s: float = 1.0,
    ):
        self.config = config
        self.store = store or JobStore()
        self.files = files or FileStore(self.store)
        self.identity, self.pid = worker_identity()
        self.parent_pid, self.poll_s = parent_pid, poll_s
        self.stopping = threading.Event()
        self._bases: dict[str, tuple[Path, object, int]] = {}  # base name -> (hf dir, ChatTokenizer, max_len)
        self._datasets: dict[str, tuple[Dataset, Dataset | None]] = {}  # job id -> validated data, until trained
        self._encoding = threading.RLock()  # one thread at a time uses a tokenizer

    # ---- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        """Until SIGTERM or the server is gone: validation in a thread of its own (a bad file is
        reported at once even while another job trains), training here."""
        log.info("worker %s polling %s", self.identity, self.store.path)
        threading.Thread(target=self._watch_parent, daemon=True).start()
        threading.Thread(target=self._validate_loop, daemon=True).start()
        while not self.stopping.is_set():
            if not self.train_next():
                self.stopping.wait(self.poll_s)
        log.info("worker %s stopped", self.identity)

    def run_once(self) -> bool:
        """Validate new jobs, then train the oldest queued one. True if it did anything."""
        return self.validate_pending() | self.train_next()

    def validate_pending(self) -> bool:
        jobs = self.store.jobs_with_status(Status.VALIDATING_FILES)
        for job in jobs:
            self.validate(job)
        return bool(jobs)

    def train_next(self) -> bool:
        """Queue again what dead workers left running, then claim and train the oldest queued job."""
        for orphan in lifecycle.requeue_orphans(self.store, STALE_S, worker_is_dead):
            log.warning("job %s lost its worker; queued again", orphan["id"])
        job = lifecycle.claim(self.store, self.identity, self.pid, STALE_S)
        if job is None:
            return False
        self.train(job)
        return True

    def _validate_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                busy = self.validate_pending()
            except Exception:  # the database busy past its timeout, say: try again next round
                log.exception("validation loop")
                busy = False
            if not busy:
                self.stopping.wait(self.poll_s)

    def _watch_parent(self) -> None:
        while not self.stopping.is_set():
            if self.parent_pid and (os.getppid() != self.parent_pid or _pid_gone(self.parent_pid)):
                log.warning("the server (pid %d) is gone; the worker stops", self.parent_pid)
                self.stopping.set()
            time.sleep(HEARTBEAT_S)

    # ---- validation ----------------------------------------------------------------------------

    def _spec(self, name: str) -> ModelSpec | None:
        return next((m for m in self.config.models if m.name == name and m.task == "generate"), None)

    def _base(self, name: str) -> tuple[Path, object, int]:
        with self._encoding:
            return self._load_base(name)

    def _load_base(self, name: str) -> tuple[Path, object, int]:
        if name not in self._bases:
            from ..models.loading import context_length, hf_dir_for
            from ..models.tokenizer import ChatTokenizer

            spec = self._spec(name)
            if spec is None:
                raise InvalidRequestError(f"the base model '{name}' is not configured on this worker.", "model")
            path = hf_dir_for(spec)
            max_len = context_length(path)
            self._bases[name] = (path, ChatTokenizer(path), max_len)
        return self._bases[name]

    def _read_data(self, job: dict) -> tuple[Dataset, Dataset | None]:
        with self._encoding:
            _, tok, max_len = self._base(job["base_model"])

            def encode(record):
                return encode_example(tok, record, max_len)

            # The job's own copies (made at create; made here for a job from before they were), so
            # neither validation nor a resume after a crash reads a file the user may have deleted.
            keep_job_files(
                self.files,
                job["out_dir"],
                {"training_file": job["training_file"], "validation_file": job["validation_file"]},
            )
            train = validate_file(
                data_path(job["out_dir"], "training_file"), "training_file", encode, max_len, MIN_TRAINING_EXAMPLES
            )
            valid = None
            if job["validation_file"]:
                valid = validate_file(
                    data_path(job["out_dir"], "validation_file"), "validation_file", encode, max_len, 1
                )
            return train, valid

    def validate(self, job: dict) -> bool:
        """validating_files -> queued, or -> failed with every problem (line numbers) in events."""
        jid = job["id"]
        self.store.add_event(
            jid,
            f"Validating training file: {job['training_file']}"
            + (f" and validation file: {job['validation_file']}" if job["validation_file"] else ""),
        )
        try:
            train, valid = self._read_data(job)
            for ds in (train, valid):
                if ds is not None and not ds.ok:
                    for p in ds.problems[:MAX_EVENTS_PER_FILE]:
                        self.store.add_event(jid, f"{ds.param}: {p}", level="error")
                    return self._fail(job, f"invalid_{ds.param}", ds.summary(), ds.param)
            hp = self._resolve(job, len(train.examples))
        except FundamentError as e:
            return self._fail(job, "invalid_request", e.message, e.param)
        except Exception as e:  # the worker survives whatever one job does
            log.exception("validating %s", jid)
            return self._fail(job, "validation_error", f"Validation failed: {type(e).__name__}: {e}", None)
        resolved = {
            "batch_size": hp.batch_size,
            "learning_rate_multiplier": hp.learning_rate_multiplier,
            "n_epochs": hp.n_epochs,
        }
        self._datasets[jid] = (train, valid)
        n_tok = train.n_tokens
        queued = lifecycle.queue(
            self.store,
            jid,
            resolved,
            f"Files validated ({len(train.examples)} training examples, {n_tok} tokens); moving job to queued state.",
        )
        if not queued:  # cancelled meanwhile
            self._drop_data_if_ended(job)
        return queued

    def _resolve(self, job: dict, n_examples: int) -> TuneConfig:
        """The job's hyperparameters, where it runs (nproc_per_node, nnodes, distributed) taken
        from this worker's `fine_tuning` settings unless the job asked."""
        hp = resolve_hyperparameters(job["hyperparameters"], n_examples, job["extensions"], seed=job["seed"])
        for name in PLACEMENT:
            if name not in (job["extensions"] or {}):
                setattr(hp, name, getattr(self.config.fine_tuning, name))
        if hp.nnodes > 1 and not self.config.fine_tuning.rdzv_endpoint:
            raise InvalidRequestError(
                f"nnodes is {hp.nnodes}, but the worker has no fine_tuning.rdzv_endpoint (host:port that every "
                "node reaches) in its config: set it, or train on one node.",
                "nnodes",
            )
        return hp

    def _fail(self, job: dict, code: str, message: str, param: str | None) -> bool:
        """-> failed with OpenAI's {code, message, param}, unless the job moved on (cancelled)."""
        failed = lifecycle.fail(self.store, job["id"], code, message, param)
        self._drop_data_if_ended(job)
        return failed

    def _drop_data_if_ended(self, job: dict) -> None:
        """The job's copy of its files goes when the job has ended, never while it may resume (paused).
        (The transition that ended it dropped it; this drops what a read racing that cancel made again.)"""
        if _current(self.store, job["id"])["status"] in FINISHED:
            drop_job_files(job["out_dir"])

    # ---- training ------------------------------------------------------------------------------

    def train(self, job: dict) -> None:
        """Train a job this worker has claimed, to success, failure, or a stop between steps."""
        jid = job["id"]
        out_dir = Path(job["out_dir"])
        done = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(jid, done), daemon=True)
        beat.start()
        hooks = JobHooks(self, job)
        try:
            resuming = latest_checkpoint(out_dir) is not None
            self.store.add_event(jid, "Fine-tuning job resumed" if resuming else "Fine-tuning job started")
            base_dir, _, _ = self._base(job["base_model"])
            queued = {j["id"] for j in self.store.jobs_with_status(Status.QUEUED)}
            cached = self._datasets.pop(jid, None)
            self._datasets = {k: v for k, v in self._datasets.items() if k in queued}  # drop cancelled ones
            train, valid = cached or self._read_data(job)
            bad = next((ds for ds in (train, valid) if ds is not None and not ds.ok), None)
            if bad is not None:  # the job's copy is gone (a job from before there were copies, say)
                self._fail(job, f"invalid_{bad.param}", bad.summary(), bad.param)
                return
            hp = self._resolve(job, len(train.examples))
            if hooks.should_stop():
                return self._after_stop(
                    job, hooks, "cancel" if _current(self.store, jid)["status"] == Status.CANCELLED else "pause"
                )
            valid_examples = valid.examples if valid else None
            if hp.nproc_per_node * hp.nnodes > 1:
                launch = TorchrunJob(jid, out_dir, hp, self.config.fine_tuning)
                result = launch.run(base_dir, train.examples, valid_examples, hooks)
            else:
                result = fine_tune(base_dir, train.examples, valid_examples, hp, out_dir, hooks)
        except FundamentError as e:  # bad values from an older version's job, or a run that diverged
            self._fail(job, e.code or "invalid_request", e.message, e.param)
            return
        except Exception as e:
            log.exception("training %s", jid)
            self._fail(job, "training_error", f"Training failed: {type(e).__name__}: {e}", None)
            return
        finally:
            done.set()
        if hooks.pending_checkpoint:
            hooks.record_checkpoint({})
        if result.stopped:
            return self._after_stop(job, hooks, result.stopped)
        self._succeed(job, result)

    def _after_stop(self, job: dict, hooks: JobHooks, why: str) -> None:
        jid, step = job["id"], hooks.last_step
        if why == "cancel":
            self.store.add_event(jid, f"Training stopped at step {step}: the job was cancelled.")
            self._drop_data_if_ended(job)
            return
        if self.stopping.is_set() and lifecycle.requeue(
            self.store,
            jid,
            f"The worker shut down at step {step}; the job is queued and resumes from there when a worker starts.",
        ):
            return
        row = _current(self.store, jid)
        if row["status"] == Status.PAUSED:
            self.store.update_job(
                jid,
                (Status.PAUSED,),
                estimated_finish=None,
                event=f"Training paused at step {step}; its state is saved for resume.",
            )

    def _succeed(self, job: dict, result) -> None:
        jid = job["id"]
        full = {
            k: result.metrics[k]
            for k in ("full_valid_loss", "full_valid_mean_token_accuracy")
            if result.metrics.get(k) is not None
        }
        if full:  # measured after the last checkpoint was written: it belongs to that checkpoint
            self.store.add_checkpoint_metrics(jid, result.steps, full)
        result_file = self.files.add_bytes(self._metrics_csv(jid), "step_metrics.csv", "fine-tune-results")
        model = fine_tuned_model_id(job)
        ok = lifecycle.succeed(
            self.store, jid, model, str(result.adapter_dir), result.trained_tokens, [result_file["id"]]
        )
        if not ok:  # cancelled at the very end: the cancel wins
            self.files.delete(result_file["id"])
        self._drop_data_if_ended(job)

    def _metrics_csv(self, job_id: str) -> bytes:
        """OpenAI's result file: one row per step."""
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        w.writerow(["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"])
        for m in self.store.metrics(job_id):
            w.writerow(
                [
                    m["step"],
                    *(
                        "" if m.get(k) is None else m[k]
                        for k in ("train_loss", "train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy")
                    ),
                ]
            )
        return out.getvalue().encode()

    def _heartbeat(self, job_id: str, done: threading.Event) -> None:
        while not done.wait(HEARTBEAT_S):
            try:
                self.store.heartbeat(job_id, self.identity)
            except Exception:  # a busy database for a moment: the next beat will do
                log.exception("heartbeat")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="fundament worker", description="Train the fine-tuning jobs queued in $FUNDAMENT_HOME."
    )
    p.add_argument("--config", help="the serve config (YAML) naming the base models")
    p.add_argument("--parent-pid", type=int, default=None, help="stop when this process (the server) is gone")
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = ServeConfig.from_yaml(args.config) if args.config else ServeConfig()
        worker = Worker(cfg, parent_pid=args.parent_pid)
    except FundamentError as e:
        print(f"fundament worker: {e.message}", file=sys.stderr)
        return 2
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stopping.set())
    worker.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
