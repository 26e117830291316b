"""The worker's side of a job that trains under torchrun: write the task, start `torchrun` (its
elastic agent starts the ranks, restarts them all if one dies, within max_restarts), turn rank
0's progress lines into the job's hooks (events, checkpoints), pass stop requests down through the
control file, and name the rank that died when torchrun gives up. Knows jobs/rank.py's files and
torchrun's command line and log; not the training.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ..adapt.hyperparameters import TuneConfig
from ..adapt.tune import TuneHooks, TuneResult
from ..config import FineTuningConfig
from ..errors import FundamentError
from .rank import CONTROL, PROGRESS, die_with_parent, write_task

POLL_S = 0.5
# torchrun's agent logs each rank that exits abnormally, e.g.
#   failed (exitcode: -9) local_rank: 1 (pid: 26437) of binary: /usr/bin/python
_FAILED = re.compile(r"failed \(exitcode: (-?\d+)\) local_rank: (\d+) \(pid: (\d+)\)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class TorchrunJob:
    """One launch of a job's ranks on this node (node 0; with nnodes > 1 the others join it)."""

    def __init__(self, job_id: str, out_dir: Path, config: TuneConfig, settings: FineTuningConfig):
        self.job_id, self.out_dir, self.config, self.settings = job_id, Path(out_dir), config, settings
        self.run_dir = self.out_dir / "torchrun"
        self.log_path = self.run_dir / "torchrun.log"
        self.endpoint = settings.rdzv_endpoint or f"127.0.0.1:{_free_port()}"

    @property
    def world_size(self) -> int:
        return self.config.nproc_per_node * self.config.nnodes

    def command(self) -> list[str]:
        """torchrun's command line for a node (the same on every node: c10d rendezvous at one endpoint)."""
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nnodes={self.config.nnodes}",
            f"--nproc-per-node={self.config.nproc_per_node}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={self.endpoint}",
            f"--rdzv-id={self.job_id}",
            f"--max-restarts={self.settings.max_restarts}",
            "-m",
            "fundament.jobs.rank",
            str(self.run_dir),
        ]

    def threads(self) -> int:
        return self.settings.threads_per_process or max(1, (os.cpu_count() or 1) // self.config.nproc_per_node)

    def run(self, base_dir: Path, train, valid, hooks: TuneHooks) -> TuneResult:
        """Train to a result (or a stop), raising FundamentError for a run that failed."""
        write_task(self.run_dir, base_dir, self.out_dir, self.config, train, valid)
        for name in (PROGRESS, CONTROL):
            (self.run_dir / name).unlink(missing_ok=True)  # a relaunch reads only its own lines
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads()), "PYTHONUNBUFFERED": "1"}
        cmd = self.command()
        what = f"{self.config.distributed.upper()}, {'NCCL' if _has_cuda() else 'gloo'}"
        hooks.on_message(
            f"Training on {self.world_size} processes ({self.config.nnodes} node(s) x {self.config.nproc_per_node}, "
            f"{what}, {self.threads()} threads each) under torchrun; global batch {self.config.batch_size} "
            f"(about {-(-self.config.batch_size // self.world_size)} examples per process)."
        )
        if self.config.nnodes > 1:
            hooks.on_message(
                f"Waiting for {self.config.nnodes - 1} more node(s) at {self.endpoint}. On each, with the same "
                f"FUNDAMENT_HOME ({self.out_dir.parent.parent}) mounted, run: {shlex.join(cmd)}"
            )
        with open(self.log_path, "ab") as log:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, preexec_fn=die_with_parent
            )
        follower = _Follower(self, hooks)
        try:
            while proc.poll() is None:
                follower.poll()
                time.sleep(POLL_S)
        except BaseException:  # the worker itself is going: its ranks go with it
            proc.send_signal(signal.SIGTERM)
            proc.wait()
            raise
        follower.poll()
        return follower.outcome(proc.returncode)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class _Follower:
    """Reads rank 0's progress lines and torchrun's log while the ranks train."""

    def __init__(self, launch: TorchrunJob, hooks: TuneHooks):
        self.launch, self.hooks = launch, hooks
        self.offset, self.log_offset = 0, 0
        self.last_step = 0
        self.failures: list[tuple[int, int, int]] = []  # (exit code, local rank, pid), as torchrun logged them
        self.reported = 0
        self.final: dict | None = None
        self.stop_sent: str | None = None

    def poll(self) -> None:
        self._read_log()
        for line in self._new_lines():
            self._handle(json.loads(line))
        stop = self.hooks.should_stop()
        if stop and stop != self.stop_sent:
            tmp = self.launch.run_dir / (CONTROL + ".tmp")
            tmp.write_text(stop)
            os.replace(tmp, self.launch.run_dir / CONTROL)
            self.stop_sent = stop

    def _new_lines(self) -> list[str]:
        try:
            with open(self.launch.run_dir / PROGRESS, encoding="utf-8") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return []
        whole = chunk[: chunk.rfind("\n") + 1]  # a line still being written waits for the next poll
        self.offset += len(whole.encode())
        return [line for line in whole.splitlines() if line.strip()]

    def _read_log(self) -> None:
        try:
            with open(self.launch.log_path, "rb") as f:
                f.seek(self.log_offset)
                chunk = f.read()
        except OSError:
            return
        self.log_offset += len(chunk)
        for m in _FAILED.finditer(chunk.decode(errors="replace")):
            self.failures.append((int(m[1]), int(m[2]), int(m[3])))

    def _culprit(self) -> str:
        """The first rank torchrun saw fail since the last report: the one that died (the others
        fail after it, from its closed connections, or are stopped by torchrun)."""
        code, local_rank, pid = self.failures[self.reported]
        who = f"rank {local_rank}" if self.launch.config.nnodes == 1 else f"local rank {local_rank} on this node"
        return f"{who} (pid {pid}) {_exit_reason(code)}"

    def _handle(self, msg: dict) -> None:
        kind = msg["kind"]
        if kind == "started" and msg["restart"] > 0:
            died = self._culprit() if len(self.failures) > self.reported else "a rank failed"
            self.reported = len(self.failures)
            self.hooks.on_message(
                f"{died[0].upper() + died[1:]} at step {self.last_step}; torchrun restarted all "
                f"{msg['world_size']} ranks (restart {msg['restart']} of {msg['max_restarts']}). "
                "They resume from the last saved state."
            )
        elif kind == "step":
            self.last_step = msg["step"]
            self.hooks.on_step(msg["step"], msg["total_steps"], msg["metrics"])
        elif kind == "checkpoint":
            self.hooks.on_checkpoint(msg["step"], Path(msg["path"]))
        elif kind == "message":
            self.hooks.on_message(msg["message"])
        elif kind in ("result", "error"):
            self.final = msg

    def outcome(self, returncode: int) -> TuneResult:
        if self.final and self.final["kind"] == "result":
            f = self.final
            adapter = Path(f["adapter_dir"]) if f["adapter_dir"] else None
            return TuneResult(adapter, f["stopped"], f["trained_tokens"], f["steps"], f["metrics"])
        if self.final:
            raise FundamentError(self.final["message"], self.final["param"], code=self.final["code"])
        if len(self.failures) > self.reported:
            died = self._culprit()
            raise FundamentError(
                f"Training failed: {died} at step {self.last_step}, and torchrun's restart budget "
                f"(fine_tuning.max_restarts = {self.launch.settings.max_restarts}) is spent. "
                f"torchrun's log: {self.launch.log_path}",
                code="rank_failed",
            )
        raise FundamentError(
            f"Training failed: torchrun {_exit_reason(returncode)} before any rank reported a result. "
            f"Its log: {self.launch.log_path}",
            code="training_error",
        )
