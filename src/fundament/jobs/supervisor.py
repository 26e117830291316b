"""The server's side of the worker: start it with the server's own config, restart it if it dies,
stop it on shutdown. The worker then finds the same base models the server serves."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import yaml

from ..config import ServeConfig, fundament_home

log = logging.getLogger(__name__)


def write_config(cfg: ServeConfig, path: Path) -> Path:
    """The serve config as YAML the worker reads back with ServeConfig.from_yaml (API keys left out)."""
    raw = dataclasses.asdict(cfg)
    raw.pop("api_keys", None)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(raw, sort_keys=False))
    os.replace(tmp, path)
    return path


def worker_env() -> dict:
    """The worker shares the cores with the server's engine (and whatever else runs). OpenMP
    threads that spin while waiting (the default) then make each training step many times slower:
    SmolLM2-135M took 10 s a step at 2 threads on a loaded 2-core machine, 0.7 s with passive waits."""
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


class WorkerProcess:
    """`python -m fundament.jobs.worker` as a child of the server."""

    def __init__(self, cfg: ServeConfig, log_level: str = "info", restart_delay_s: float = 2.0):
        self.config_path = write_config(cfg, fundament_home() / "run" / f"worker-config-{os.getpid()}.yaml")
        self.log_level = log_level
        self.restart_delay_s = restart_delay_s
        self.proc: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._watch: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def _spawn(self) -> None:
        cmd = [
            sys.executable,
            "-m",
            "fundament.jobs.worker",
            "--config",
            str(self.config_path),
            "--parent-pid",
            str(os.getpid()),
            "--log-level",
            self.log_level,
        ]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=worker_env())
        log.info("started the fine-tuning worker (pid %d)", self.proc.pid)

    def start(self) -> None:
        with self._lock:
            self._spawn()
        self._watch = threading.Thread(target=self._supervise, daemon=True)
        self._watch.start()

    def _supervise(self) -> None:
        while not self._stopping.wait(self.restart_delay_s):
            with self._lock:
                proc = self.proc
                assert proc is not None  # start() spawned it before starting this thread
                if self._stopping.is_set() or proc.poll() is None:
                    continue
                log.warning("the fine-tuning worker exited with %s; starting another", proc.returncode)
                self._spawn()

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM: the worker saves a running job's state at its next step and queues it again."""
        self._stopping.set()
        with self._lock:
            if self.proc is None or self.proc.poll() is not None:
                return
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("the fine-tuning worker did not stop in %.0fs; killing it", timeout_s)
                self.proc.kill()
                self.proc.wait()
        self.config_path.unlink(missing_ok=True)
