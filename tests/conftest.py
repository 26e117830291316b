"""Every test gets its own home directory and no hub access. The real default models are served
once per session by a real `fundament serve` on 127.0.0.1 (fixture `server`)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

# The engine's tests run on this device: FUNDAMENT_TEST_DEVICE=cuda runs them on a GPU (the same
# code path; CI has none), and their references (HF transformers, PEFT) run there too.
DEVICE = os.environ.get("FUNDAMENT_TEST_DEVICE", "cpu")


@pytest.fixture(scope="module", params=["native", "python"])
def native_decode(request) -> bool:
    """Both ways decode rows run: through the native kernel (where this machine can build it) and
    through PyTorch calls from Python. Tests of the engine take this to run each way."""
    if request.param == "native":
        from fundament.models import native

        if not native.load():
            pytest.skip("the native decode kernel cannot be built here (no C++ compiler)")
    return request.param == "native"


@pytest.fixture(scope="session", autouse=True)
def _shared_cache(tmp_path_factory):
    """One $FUNDAMENT_CACHE for the session: each test's home is its own, but a GGUF is dequantized
    once (not once per test and server: 0.5 GB and seconds each time)."""
    os.environ["FUNDAMENT_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("FUNDAMENT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A `fundament serve` subprocess, stopped by its pid."""

    def __init__(self, args: list[str], home: Path, env: dict | None = None, timeout: float = 180):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.log = home / f"server-{self.port}.log"
        home.mkdir(parents=True, exist_ok=True)
        e = {k: v for k, v in os.environ.items() if k != "FUNDAMENT_API_KEY"}
        e.update(FUNDAMENT_HOME=str(home), **(env or {}))
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fundament.cli", "serve", "--port", str(self.port), "--log-level", "warning", *args],
            stdout=open(self.log, "w"),
            stderr=subprocess.STDOUT,
            env=e,
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200:
                    self.ready_s = time.perf_counter() - self.started
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not start in {timeout}s:\n{self.log.read_text()[-3000:]}")

    def health(self) -> dict:
        return httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=5).json()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="session")
def server(tmp_path_factory, _shared_cache):
    srv = ServerProcess([], tmp_path_factory.mktemp("server-home"))
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def smollm_dir(server):
    """The Hugging Face directory the session's server dequantized the default GGUF into."""
    dirs = list((Path(os.environ["FUNDAMENT_CACHE"]) / "gguf").glob("SmolLM2-135M-Instruct*"))
    assert len(dirs) == 1, dirs
    return dirs[0]


def post(server, path: str, body, headers=None) -> httpx.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    h = {"content-type": "application/json", "authorization": "Bearer sk-test", **(headers or {})}
    return httpx.post(f"{server.base_url}{path}", content=data, headers=h, timeout=120)


def make_tiny_llama(path: Path, vocab_size: int = 512, seed: int = 0, layers: int = 2, init_std: float = 0.02) -> Path:
    """A randomly initialised Llama small enough for unit tests, saved as a Hugging Face directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=init_std,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def make_lora(
    base_dir: Path,
    out: Path,
    seed: int = 0,
    targets=("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"),
    r: int = 4,
    std: float = 0.05,
) -> Path:
    """A PEFT LoRA adapter for base_dir with random (non-zero) A and B, saved as PEFT saves it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(
        base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False)
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)
    model.save_pretrained(out)
    return out
