"""The fundament server an evaluation talks to: one the user names by base URL, or a `fundament
serve` subprocess of its own on 127.0.0.1 (with its fine-tuning worker), stopped by its pid.
Knows processes and the official `openai` client; nothing of tasks or strategies.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import FundamentError
from .measure import child_pids, resident_kb

if TYPE_CHECKING:
    from openai import OpenAI

log = logging.getLogger(__name__)


def openai_client(base_url: str, api_key: str | None, timeout: float = 600) -> OpenAI:
    try:
        from openai import OpenAI
    except ImportError:
        raise FundamentError(
            "evaluations talk to servers through the official client: pip install openai", "openai"
        ) from None
    return OpenAI(base_url=base_url, api_key=api_key or "fundament", max_retries=2, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """`fundament serve` on a free port of 127.0.0.1; its log goes to `log_path`."""

    def __init__(
        self, log_path: Path, home: Path | None = None, extra_args: list[str] | None = None, timeout_s: float = 600
    ):
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.home = Path(home) if home else None
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "FUNDAMENT_API_KEY"}
        if self.home:
            env["FUNDAMENT_HOME"] = str(self.home)
        cmd = [
            sys.executable,
            "-m",
            "fundament.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            *(extra_args or []),
        ]
        log.info("starting %s (log: %s)", " ".join(cmd[1:]), log_path)
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self._wait_ready(log_path, timeout_s)

    def _wait_ready(self, log_path: Path, timeout_s: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise FundamentError(
                    f"the evaluation's server exited with {self.proc.returncode}; see {log_path}:\n{log_path.read_text()[-2000:]}"
                )
            try:
                r = httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2)
                # a model on vLLM answers once its vLLM server is up (state "ready"), a minute or so later
                if r.status_code == 200 and all(
                    e.get("state", "ready") == "ready" for e in r.json().get("engines", {}).values()
                ):
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        self.stop()
        raise FundamentError(f"the evaluation's server did not answer /health within {timeout_s:.0f}s; see {log_path}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def worker_pid(self) -> int | None:
        """The fine-tuning worker the server started (its only child process)."""
        kids = [p for p in child_pids(self.proc.pid) if b"jobs.worker" in _cmdline(p)]  # not a vLLM server
        return kids[0] if kids else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM to this pid: the server stops its worker on the way out
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


class Fundament:
    """The fundament server of a run, started the first time a strategy asks for it."""

    def __init__(self, base_url: str | None, api_key: str | None, log_path: Path, serve_args: list[str] | None = None):
        self.base_url, self.api_key, self.log_path = base_url, api_key, log_path
        self.serve_args = list(serve_args or [])  # for the server this run starts
        self._backends: dict[str, str | None] = {}
        self.server: LocalServer | None = None
        self._client: OpenAI | None = None
        self._worker_idle: tuple[int, int | None] | None = None

    @property
    def client(self) -> OpenAI:
        if self._client is None:
            if self.base_url is None:
                self.server = LocalServer(self.log_path, extra_args=self.serve_args)
                self.base_url = self.server.base_url
            self._client = openai_client(self.base_url, self.api_key)
        return self._client

    def backend(self, model: str) -> str | None:
        """What generates for `model`: "vllm", "fundament", or None where the server does not say
        (not a fundament server). A server this run starts is asked nothing: its flags tell."""
        if self.base_url is None or self.server is not None:
            return "vllm" if "--vllm" in self.serve_args else "fundament"
        if model not in self._backends:
            import httpx

            try:
                root = self.base_url.rstrip("/").removesuffix("/v1")
                engines = httpx.get(root + "/health", timeout=10).json().get("engines", {})
                served = engines.get(model) or (next(iter(engines.values())) if len(engines) == 1 else None)
                self._backends[model] = (served or {}).get("backend", "fundament" if served else None)
            except (httpx.HTTPError, ValueError, AttributeError):
                self._backends[model] = None
        return self._backends[model]

    def worker(self) -> tuple[int, int | None] | None:
        """(pid, idle resident kB) of the fine-tuning worker where this run started the server
        (else unknown: None). The idle size is read the first time, before any job of this run."""
        pid = None if self.server is None else self.server.worker_pid()  # asked once: it may die meanwhile
        if pid is None:
            return None
        if self._worker_idle is None or self._worker_idle[0] != pid:  # a restarted worker: measured again
            self._worker_idle = (pid, resident_kb(pid))
        return self._worker_idle

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
            self._client, self.base_url = None, None
