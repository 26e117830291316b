"""One rank of a fine-tuning job that runs under torchrun: `python -m fundament.jobs.rank RUN_DIR`,
as jobs/launch.py starts it. Reads the job's task (data as token ids, hyperparameters, base model)
from RUN_DIR/task.json, trains its share with adapt/tune.py, and, on rank 0, reports progress as
JSON lines in RUN_DIR/progress.jsonl and hears stop requests from RUN_DIR/control. Knows no SQLite:
the worker that launched it turns those lines into the job's events.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from ..adapt.examples import Example
from ..adapt.hyperparameters import TuneConfig
from ..adapt.parallel import Parallel
from ..adapt.tune import TuneHooks, fine_tune
from ..errors import FundamentError

PROGRESS, CONTROL, TASK = "progress.jsonl", "control", "task.json"


def write_task(run_dir: Path, base_dir: Path, out_dir: Path, config: TuneConfig, train, valid) -> Path:
    """What every rank needs to train, in one file (atomically: a rank never reads half of it)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    task = {
        "base_dir": str(base_dir),
        "out_dir": str(out_dir),
        "config": {k: v for k, v in config.to_dict().items() if k != "learning_rate"},
        "train": [[ex.input_ids, ex.labels] for ex in train],
        "valid": [[ex.input_ids, ex.labels] for ex in valid] if valid else None,
    }
    tmp = run_dir / (TASK + ".tmp")
    tmp.write_text(json.dumps(task))
    os.replace(tmp, run_dir / TASK)
    return run_dir / TASK


class RankHooks(TuneHooks):
    """Rank 0's hooks: every event a JSON line for the worker, stop requests from its control file."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.out = open(run_dir / PROGRESS, "a", encoding="utf-8")

    def emit(self, kind: str, **data) -> None:
        self.out.write(json.dumps({"kind": kind, **data}, default=str) + "\n")
        self.out.flush()

    def on_step(self, step: int, total_steps: int, metrics: dict) -> None:
        self.emit("step", step=step, total_steps=total_steps, metrics=metrics)

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.emit("checkpoint", step=step, path=str(path))

    def on_message(self, message: str) -> None:
        self.emit("message", message=message)

    def should_stop(self) -> str | None:
        try:
            request = (self.run_dir / CONTROL).read_text().strip()
        except OSError:
            return None
        return request if request in ("pause", "cancel") else None


def die_with_parent() -> None:
    """This process gets SIGTERM when its parent dies, even by SIGKILL: a rank whose torchrun agent
    is killed, or torchrun whose worker is, never goes on training alone."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    die_with_parent()
    run_dir = Path((argv or sys.argv[1:])[0])
    task = json.loads((run_dir / TASK).read_text())
    config = TuneConfig(**task["config"])
    parallel = Parallel.from_env(config.distributed)
    hooks = RankHooks(run_dir) if parallel.is_main else TuneHooks()
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if isinstance(hooks, RankHooks):
        hooks.emit(
            "started",
            world_size=parallel.world_size,
            restart=restarts,
            max_restarts=int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")),
            device=str(parallel.device),
        )

    def examples(rows):
        return [Example(ids, labels) for ids, labels in rows] if rows else None

    try:
        result = fine_tune(
            Path(task["base_dir"]),
            examples(task["train"]) or [],
            examples(task["valid"]),
            config,
            Path(task["out_dir"]),
            hooks,
            parallel,
        )
        outcome: dict[str, Any] = {
            "kind": "result",
            "adapter_dir": str(result.adapter_dir) if result.adapter_dir else None,
            "stopped": result.stopped,
            "trained_tokens": result.trained_tokens,
            "steps": result.steps,
            "metrics": result.metrics,
        }
    except FundamentError as e:  # a run that diverged: every rank saw the same reduced loss, so all fail alike
        outcome = {"kind": "error", "code": e.code, "message": e.message, "param": e.param}
    if isinstance(hooks, RankHooks):
        hooks.emit(outcome.pop("kind"), **outcome)
    parallel.close()
    return 0  # an outcome is no crash: torchrun restarts the ranks only when one fails


if __name__ == "__main__":
    sys.exit(main())
