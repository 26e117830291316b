"""A vLLM OpenAI server that fundament starts, watches and restarts: one per model served with
`vllm: {}` and no `url`.

It runs `python -m vllm.entrypoints.openai.api_server` in its own process group (vLLM's engine core
is a child process; a restart must not leave it behind) with runtime LoRA loading on, so fine-tuned
adapters can be added while it serves. A thread waits for its /health, reports it ready, and when
the process exits starts it again after a pause that doubles up to a minute.
Knows processes, ports and vLLM's flags; knows nothing of requests.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from ..config import VLLMSpec, fundament_home
from ..errors import ConfigError

log = logging.getLogger(__name__)

BACKOFF_MAX_S = 60.0


def vllm_python(spec: VLLMSpec) -> str:
    """The interpreter of vLLM's environment: the config's, $FUNDAMENT_VLLM_PYTHON, or the one
    `make vllm-env` builds (.venv-vllm in the working directory or beside the source tree)."""
    candidates = [spec.python, os.environ.get("FUNDAMENT_VLLM_PYTHON")]
    candidates += [str(Path.cwd() / ".venv-vllm/bin/python")]
    candidates += [str(Path(__file__).resolve().parents[3] / ".venv-vllm/bin/python")]
    for c in candidates:
        if c and (Path(c).exists() or shutil.which(c)):
            return c
    raise ConfigError(
        "vLLM's Python environment was not found: build it with `make vllm-env` (scripts/vllm_env.sh), "
        "or give its interpreter as vllm.python in the config or $FUNDAMENT_VLLM_PYTHON.",
        "vllm.python",
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """One supervised vLLM server. `state`: "starting", "ready", "restarting" or "stopped"."""

    def __init__(self, name: str, model_dir: Path, spec: VLLMSpec, on_ready: Callable[[], None] = lambda: None):
        self.name, self.model_dir, self.spec = name, Path(model_dir), spec
        self.python = vllm_python(spec)
        self.port = spec.port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.on_ready = on_ready
        self.state = "stopped"
        self.restarts = 0
        self.last_exit: str | None = None
        self.started_at = 0.0
        self.proc: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.log_path = fundament_home() / "logs" / f"vllm-{name}.log"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def command(self) -> list[str]:
        s = self.spec
        cmd = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir)]
        cmd += ["--served-model-name", self.name, "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--dtype", s.dtype, "--enable-lora", "--max-lora-rank", str(s.max_lora_rank)]
        cmd += ["--max-loras", str(s.max_loras)]
        # fundament compiles response_format, tools and guided_* to llguidance grammars; vLLM's
        # guidance backend enforces exactly those (docs/scaling.md).
        cmd += ["--structured-outputs-config", '{"backend": "guidance"}']
        if s.max_model_len is not None:
            cmd += ["--max-model-len", str(s.max_model_len)]
        return cmd + list(s.args)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"  # /v1/load_lora_adapter, /v1/unload_lora_adapter
        env.pop("FUNDAMENT_VLLM_PYTHON", None)
        env.update(self.spec.env)
        return env

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._supervise, name=f"vllm-{self.name}", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._terminate()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self.state = "stopped"

    def check(self) -> None:
        """A request found the server unreachable: if its process is gone, say so now rather than
        at the supervisor's next look (it restarts it)."""
        proc = self.proc
        if self.state == "ready" and proc is not None and proc.poll() is not None:
            self.state = "restarting"
            self.last_exit = self.last_exit or "its process ended"

    def describe(self) -> str:
        """What a request that cannot be served now is told."""
        if self.state == "starting":
            since = time.time() - self.started_at
            return f"is starting (pid {self.pid}, {since:.0f} s so far; vLLM compiles on its first start)"
        if self.state == "restarting":
            return f"is restarting after it exited ({self.last_exit}; its log: {self.log_path})"
        return f"is {self.state}"

    def log_tail(self, n: int = 12) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    # ---- the supervising thread ----------------------------------------------------------

    def _supervise(self) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            self.state = "starting" if self.restarts == 0 else "restarting"
            ready_at = self._run_once()
            if self._stop.is_set():
                return
            self.restarts += 1
            # A server that served for ten minutes gets a fresh backoff: this is a new fault.
            backoff = 1.0 if ready_at and time.time() - ready_at > 600 else backoff
            self.state = "restarting"
            log.error("vLLM server for %s exited (%s); restarting in %.0f s", self.name, self.last_exit, backoff)
            if self._stop.wait(backoff):
                return
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    def _run_once(self) -> float | None:
        """Start the server, wait for it to be ready and then for it to exit; when it was ready."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.started_at = time.time()
        with open(self.log_path, "ab") as logf:
            logf.write(f"\n==== {time.ctime()}: {' '.join(self.command())}\n".encode())
            logf.flush()
            self.proc = subprocess.Popen(
                self.command(),
                env=self.environment(),
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: the engine core goes with it
                preexec_fn=_die_with_parent,
            )
        log.info("started vLLM for %s: pid %d, %s, log %s", self.name, self.proc.pid, self.url, self.log_path)
        ready_at = None
        deadline = self.started_at + self.spec.startup_timeout_s
        while not self._stop.is_set():
            code = self.proc.poll()
            if code is not None:
                self.last_exit = f"exit status {code}" if code >= 0 else f"killed by {signal.Signals(-code).name}"
                self._terminate()  # whatever of its group is left
                return ready_at
            if ready_at is None:
                if self._healthy():
                    ready_at = time.time()
                    log.info("vLLM for %s is ready after %.0f s", self.name, ready_at - self.started_at)
                    try:
                        self.on_ready()
                    except Exception:
                        log.exception("vLLM for %s: re-registering adapters failed", self.name)
                    self.state = "ready"
                elif time.time() > deadline:
                    self.last_exit = f"not ready after {self.spec.startup_timeout_s:.0f} s (vllm.startup_timeout_s)"
                    self._terminate()
                    return None
            self._stop.wait(0.5)
        return ready_at

    def _healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def _terminate(self) -> None:
        """SIGTERM the server's process group, SIGKILL what is left after 10 s."""
        proc = self.proc
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                break
            try:
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            # The leader is gone; its group may not be (the engine core): one more pass kills it.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            break


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the thread that started it ends (fundament killed
    with SIGKILL, say), so no vLLM outlives the server that supervised it (Linux only)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
