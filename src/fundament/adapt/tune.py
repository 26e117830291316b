"""A fine-tuning run: examples in, a PEFT adapter directory out. Owns the loop over epochs and
steps, checkpoints, resuming after a crash or a pause, and stopping a run that diverged, in one
process or as one rank of a torchrun job (`Parallel`). Knows nothing of jobs, SQLite or HTTP: the
caller passes `TuneHooks` to hear progress and to ask it to stop (rank 0's hooks speak for all ranks).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import FundamentError, InvalidRequestError
from .examples import Example, pack
from .hyperparameters import PLACEMENT, TuneConfig
from .parallel import Parallel
from .trainer import Trainer, should_compile, warm_up

# How much training a crash may cost at most (plus one step); FUNDAMENT_RESUME_EVERY_S sets it
# (for every rank of a torchrun job, which a setting in this process would not reach).
RESUME_EVERY_S = float(os.environ.get("FUNDAMENT_RESUME_EVERY_S", "10"))


class TuneHooks:
    """What the caller hears and how it stops a run. Subclass and override."""

    def on_step(self, step: int, total_steps: int, metrics: dict) -> None:
        pass

    def on_checkpoint(self, step: int, path: Path) -> None:
        pass

    def on_message(self, message: str) -> None:
        """Something the user should hear of, between steps (a job event)."""

    def should_stop(self) -> str | None:
        return None


@dataclass
class TuneResult:
    adapter_dir: Path | None
    stopped: str | None
    trained_tokens: int
    steps: int
    metrics: dict


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The resume state a crashed or paused run continues from, if any."""
    p = Path(out_dir) / "resume"
    return p if (p / "state.pt").exists() else None


def _epoch_batches(train: list[Example], config: TuneConfig, epoch: int) -> list[list[Example]]:
    order = list(range(len(train)))
    random.Random(config.seed * 1000 + epoch).shuffle(order)
    return [[train[i] for i in order[s : s + config.batch_size]] for s in range(0, len(order), config.batch_size)]


def _diverged(step: int, what: str, config: TuneConfig) -> FundamentError:
    """A run whose loss, gradients or weights overflow has diverged: every later step is NaN and
    the adapter would answer nothing. The job fails with the step and what to change."""
    return FundamentError(
        f"Training diverged at step {step}: {what}. Lower learning_rate_multiplier (it is {config.learning_rate_multiplier:g}, "
        f"a learning rate of {config.learning_rate:g}) or lora_alpha (it is {config.lora_alpha:g}) and create the job again.",
        code="training_diverged",
    )


def fine_tune(
    base_dir: Path,
    train: list[Example],
    valid: list[Example] | None,
    config: TuneConfig,
    out_dir: Path,
    hooks: TuneHooks | None = None,
    parallel: Parallel | None = None,
) -> TuneResult:
    """Train a LoRA adapter on `train`; write checkpoints (one per epoch, each a PEFT directory
    under out_dir/checkpoints/) and the final adapter (out_dir/adapter). Resumes by itself from
    out_dir/resume if an earlier run of the same job stopped part-way (crash or pause), on any
    number of ranks. A run whose loss, gradients or weights stop being finite raises
    FundamentError (code training_diverged). With `parallel` of several ranks, every rank calls
    this with the same arguments; files are written by rank 0."""
    hooks = hooks or TuneHooks()
    parallel = parallel or Parallel()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not train:
        raise InvalidRequestError("there are no training examples.", "training_file")
    trainer = Trainer(Path(base_dir), config, parallel=parallel)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total = steps_per_epoch * config.n_epochs
    eval_every = config.eval_every or max(1, total // 10)
    valid_sample = (valid or [])[:256]
    meta = {
        "base_model_dir": str(base_dir),
        "config": config.to_dict(),
        "train_examples": len(train),
        "valid_examples": len(valid or []),
        "world_size": parallel.world_size,
    }

    step, trained_tokens, history = 0, 0, []
    resume = latest_checkpoint(out_dir)
    if resume is not None:
        state = trainer.load_resume(resume)
        if _same_result(state.get("config")) != _same_result(config.to_dict()):
            raise InvalidRequestError(
                "the run's saved state was made with other hyperparameters; cannot resume it.", "hyperparameters"
            )
        step, trained_tokens, history = state["step"], state["trained_tokens"], state["history"]
    last_save = time.monotonic()
    metrics: dict = history[-1] if history else {}

    def resume_state():
        return {"step": step, "trained_tokens": trained_tokens, "history": history, "config": config.to_dict()}

    trainer.model.train()
    meta["compiled"] = should_compile(config, train, parallel.distributed) and step < total and trainer.compile()
    if meta["compiled"]:
        hooks.on_message(
            "Compiling the model's layers before the first step (torch.compile; 15-45 s on 2 cores, then each step is faster)."
        )
        epoch, i = divmod(step, steps_per_epoch)
        first = pack(_epoch_batches(train, config, epoch)[i], config.row_tokens)[0]
        stop = warm_up(
            trainer, first, pack(valid_sample, config.row_tokens)[0] if valid_sample else None, hooks.should_stop
        )
        if stop:
            return TuneResult(None, stop, trained_tokens, step, metrics)
    while step < total:
        t_step = time.perf_counter()
        epoch, i = divmod(step, steps_per_epoch)
        batch = _epoch_batches(train, config, epoch)[i]
        for g in trainer.opt.param_groups:
            g["lr"] = trainer.lr_at(step, total)
        n_loss = sum(ex.n_loss_tokens for ex in batch)
        # The step's loss is the mean over all its learned tokens, on every rank's share: DDP and
        # FSDP average the ranks' gradients, so each rank's sum is scaled by world_size / n_loss.
        scale = parallel.world_size / n_loss
        rows = parallel.rows(batch, config.row_tokens)
        loss_sum, right = 0.0, 0.0
        for k, (row, weight) in enumerate(rows):
            with trainer.accumulating(last=k == len(rows) - 1):
                loss, _, c = trainer.row_loss(row)
                (loss * (weight * scale)).backward()
            loss_sum, right = loss_sum + weight * loss.item(), right + weight * c
        loss_sum, right = parallel.sum([loss_sum, right])
        grad_norm = trainer.clip_grads(1.0)
        # Checked before anything is saved: no checkpoint or adapter holds an inf or a NaN.
        if not math.isfinite(loss_sum):
            raise _diverged(step + 1, f"the training loss became non-finite ({loss_sum / n_loss})", config)
        if not math.isfinite(grad_norm):
            raise _diverged(step + 1, f"the gradient norm became non-finite ({grad_norm})", config)
        trainer.opt.step()
        if not trainer.weights_finite():
            raise _diverged(step + 1, "the adapter's weights became non-finite in the optimizer's update", config)
        trainer.opt.zero_grad(set_to_none=True)
        step += 1
        trained_tokens += sum(ex.n_tokens for ex in batch)
        metrics = {
            "step": step,
            "train_loss": loss_sum / n_loss,
            "train_mean_token_accuracy": right / n_loss,
            "tokens": trained_tokens,
            "learning_rate": trainer.lr_at(step - 1, total),
            "grad_norm": grad_norm,  # before clipping to 1
            "world_size": parallel.world_size,
            "tokens_per_second": sum(ex.n_tokens for ex in batch) / (time.perf_counter() - t_step),  # all ranks'
        }
        if valid_sample and (step % eval_every == 0 or step == total):
            metrics["valid_loss"], metrics["valid_mean_token_accuracy"] = trainer.evaluate(valid_sample)
        history.append(metrics)
        if step % steps_per_epoch == 0 or step == total:
            ckpt = out_dir / "checkpoints" / f"step-{step}"
            trainer.save_adapter(ckpt, {**meta, "step": step, "metrics": metrics})
            hooks.on_checkpoint(step, ckpt)
        hooks.on_step(step, total, dict(metrics))
        stop = hooks.should_stop() if step < total else None
        save = stop == "pause" or (step < total and time.monotonic() - last_save >= RESUME_EVERY_S)
        stop, save = parallel.agree(stop, save)
        if save:
            trainer.save_resume(out_dir, resume_state())
            last_save = time.monotonic()
        if stop in ("cancel", "pause"):
            return TuneResult(None, stop, trained_tokens, step, metrics)

    if valid and len(valid) > len(valid_sample):
        metrics["full_valid_loss"], metrics["full_valid_mean_token_accuracy"] = trainer.evaluate(valid)
    elif valid:
        metrics["full_valid_loss"], metrics["full_valid_mean_token_accuracy"] = (
            metrics["valid_loss"],
            metrics["valid_mean_token_accuracy"],
        )
    final = out_dir / "adapter"
    trainer.save_adapter(final, {**meta, "steps": step, "trained_tokens": trained_tokens, "metrics": metrics})
    if parallel.is_main:
        (out_dir / "metrics.json").write_text(json.dumps(history))
        shutil.rmtree(out_dir / "resume", ignore_errors=True)
    return TuneResult(final, None, trained_tokens, step, metrics)


def _same_result(config: dict | None) -> dict | None:
    """A run's settings less where it runs: a run resumes on another number of ranks."""
    return {k: v for k, v in config.items() if k not in PLACEMENT} if config else config
