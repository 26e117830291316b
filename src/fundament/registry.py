"""The registry of served models: names, aliases, and the loaded generators and embedders behind them.

It loads what each entry names (GGUF, Hugging Face or sentence-transformers directory) and hands
the serving layer a `ServedGenerator` (tokenizer + engine) or a `ServedEmbedder` by name or alias.
Fine-tuned models come from an optional source (the JobStore): their adapters load into the base
model's engine the first time a request names them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from .adapt.export import ModelFiles
from .config import EngineConfig, ModelSpec, SamplingDefaults, ServeConfig
from .engine import Engine
from .engine.vllm import VLLMEngine
from .errors import ConfigError, InvalidRequestError, ModelNotFoundError, ServiceUnavailableError
from .models.device import resolve_device, resolve_dtype, resolve_kv_dtype
from .models.embedder import Embedder
from .models.llama import LlamaModel
from .models.llama.config import LlamaConfig
from .models.loading import context_length, hf_dir_for, resolve_path
from .models.memory import release_free_memory
from .models.tokenizer import ChatTokenizer
from .models.transformers_model import TransformersModel

log = logging.getLogger(__name__)


@dataclass
class ServedGenerator:
    """A generation model as served: its tokenizer and the engine running its weights."""

    name: str
    spec: ModelSpec
    tokenizer: ChatTokenizer
    engine: Engine | VLLMEngine  # fundament's own, or a vLLM server's (spec.vllm)
    created: int
    fingerprint: str

    @property
    def defaults(self) -> SamplingDefaults:
        return self.spec.sampling


@dataclass
class ServedEmbedder:
    """An embedding model as served: the sentence encoder behind a name."""

    name: str
    spec: ModelSpec
    embedder: Embedder
    created: int


def load_generator(spec: ModelSpec, engine_config: EngineConfig) -> ServedGenerator:
    path = hf_dir_for(spec)
    tokenizer = ChatTokenizer(path)
    fp = "fp_" + hashlib.sha256(f"{spec.name}:{path}".encode()).hexdigest()[:10]
    if spec.vllm is not None:  # vLLM runs the weights; fundament keeps the tokenizer and the API
        vllm = VLLMEngine(spec.name, spec.vllm, engine_config, tokenizer.eos_token_ids, context_length(path), path)
        return ServedGenerator(spec.name, spec, tokenizer, vllm, int(time.time()), fp)
    engine = Engine(load_weights(spec.name, path, engine_config), engine_config, tokenizer.eos_token_ids)
    return ServedGenerator(spec.name, spec, tokenizer, engine, int(time.time()), fp)


def load_weights(name: str, path: Path, engine_config: EngineConfig) -> LlamaModel | TransformersModel:
    """The native engine's model where it takes the architecture, else transformers' own (the
    fallback: every decoder-only causal LM transformers loads); the log says which, and why."""
    device = resolve_device(engine_config.device)
    dtype = resolve_dtype(engine_config.dtype, device)
    try:
        cfg = LlamaConfig.from_hf(json.loads((path / "config.json").read_text()))
    except InvalidRequestError as e:
        log.info("model %s: served through transformers (the native engine does not take it: %s)", name, e.message)
        model = TransformersModel.from_dir(path, dtype=dtype, device=device)
        model.reason = e.message
        return model
    log.info("model %s: served by the native engine", name)
    return LlamaModel.from_dir(
        path,
        dtype=dtype,
        kv_dtype=resolve_kv_dtype(engine_config.kv_cache_dtype, dtype),
        int8_activations=engine_config.int8_activations,
        device=device,
        int8_decode=engine_config.int8_decode,
        native_decode=engine_config.native_decode,
        batch_invariant=engine_config.batch_invariant,
        cfg=cfg,
    )


def load_embedder(spec: ModelSpec) -> ServedEmbedder:
    return ServedEmbedder(spec.name, spec, Embedder(resolve_path(spec)), int(time.time()))


def spec_from_path(path: str, task: Literal["generate", "embed"] | None = None) -> ModelSpec:
    """A model entry for `fundament serve --model PATH`: the name is the file or directory name."""
    p = Path(path).expanduser()
    if task is None:
        task = "embed" if (p / "modules.json").exists() else "generate"
    name = p.stem if p.suffix == ".gguf" else p.name
    return ModelSpec(name=name.lower(), task=task, path=str(p))


def locate_model(config: ServeConfig, name: str, fine_tuned: FineTunedSource | None = None) -> ModelFiles:
    """What a served name (a base model, an alias, a configured adapter, an ft: model or checkpoint)
    is made of on disk, without loading it: for `fundament export`."""
    name = config.aliases.get(name, name)
    specs = {m.name: m for m in config.models if m.task == "generate"}
    adapter_dir, base = None, name
    if name not in specs:
        adapter = next((a for a in config.adapters if a.name == name), None)
        found = fine_tuned.fine_tuned_model(name) if fine_tuned is not None and adapter is None else None
        if adapter is not None:
            adapter_dir, base = Path(adapter.path), adapter.base
        elif found is not None:
            adapter_dir, base = Path(found["path"]), found["base_model"]
        else:
            raise ModelNotFoundError(name)
    if base not in specs:
        raise ModelNotFoundError(base)
    spec = specs[base]
    source = resolve_path(spec)
    return ModelFiles(
        name=name,
        base_name=base,
        base_dir=hf_dir_for(spec),
        adapter_dir=adapter_dir,
        gguf=source if source.suffix == ".gguf" else None,
        hub_id=spec.hub_id,
    )


def export(name: str, fmt: str, out, quantization: str = "f16", config: ServeConfig | None = None) -> list[Path]:
    """Export a served name as `fmt` (peft, merged or gguf) into the directory `out`; the files
    written. ft: models are found in $FUNDAMENT_HOME's job store."""
    from .adapt.export import export_model
    from .jobs.store import JobStore

    model = locate_model(config or ServeConfig(), name, JobStore())
    return export_model(model, fmt, Path(out), quantization)


class FineTunedSource(Protocol):
    """Where fine-tuned models are recorded (fundament.jobs.store.JobStore is one): rows of
    {id, base_model, created, path, job_id, out_dir, kind ("model" or "checkpoint")}."""

    def fine_tuned_models(self) -> list[dict]: ...

    def fine_tuned_model(self, model_id: str) -> dict | None: ...

    def delete_fine_tuned_model(self, model_id: str) -> dict | None: ...

    def discard_fine_tuned_files(self, model: dict) -> None: ...


class ModelRegistry:
    def __init__(self, config: ServeConfig, fine_tuned: FineTunedSource | None = None):
        self.config = config
        self.generators: dict[str, ServedGenerator] = {}
        self.embedders: dict[str, ServedEmbedder] = {}
        self.aliases = dict(config.aliases)
        self.adapters: dict[str, tuple[str, int]] = {}  # adapter model id -> (base name, created)
        self.fine_tuned = fine_tuned
        self._fine_tuned_loaded: set[str] = set()  # adapters loaded from the source (deletable)
        self._lock = threading.Lock()
        self._sync_failed: dict[str, float] = {}  # fine-tuned model -> when vLLM may be asked again

    def load_all(self) -> None:
        for spec in self.config.models:
            t = time.perf_counter()
            if spec.task == "generate":
                self.generators[spec.name] = load_generator(spec, self.config.engine)
            else:
                self.embedders[spec.name] = load_embedder(spec)
            log.info("loaded %s in %.1fs", spec.name, time.perf_counter() - t)
        for a in self.config.adapters:
            self.add_adapter(a.name, a.path, a.base)
        names = set(self.generators) | set(self.embedders) | set(self.adapters)
        self.aliases = {a: t for a, t in self.aliases.items() if t in names and a not in names}
        release_free_memory()  # loading's temporaries: ~200-300 MB that would stay resident

    def add_adapter(self, name: str, path, base: str) -> None:
        """Serve a PEFT LoRA directory as model `name` on top of the generation model `base` (from
        the server's configuration: a mistake here is a ConfigError, not a request's 400)."""
        base = self.canonical(base)
        if base not in self.generators:
            raise ConfigError(f"adapter '{name}': base model '{base}' is not served here", "adapters.base")
        if name in self.generators or name in self.embedders:
            raise ConfigError(f"adapter name '{name}' is already a base model's name", "adapters.name")
        self.generators[base].engine.load_adapter(name, path)
        self.adapters[name] = (base, int(time.time()))

    def remove_adapter(self, name: str) -> None:
        base, _ = self.adapters.pop(name)
        self.generators[base].engine.remove_adapter(name)

    def start(self) -> None:
        for g in self.generators.values():
            g.engine.start()

    def wait_ready(self, timeout_s: float = 1200.0) -> None:
        """Block until every engine serves: a vLLM server started here takes a minute or so. For
        in-process use (`fundament classify`); the HTTP server answers 503 meanwhile instead."""
        deadline = time.time() + timeout_s
        for g in self.generators.values():
            while isinstance(g.engine, VLLMEngine) and not g.engine.ready:
                server = g.engine.server
                if server is not None and server.restarts >= 2:  # it cannot start: say why, not wait
                    raise ServiceUnavailableError(
                        f"model '{g.name}': its vLLM server exited {server.restarts} times ({server.last_exit}); "
                        f"see {server.log_path}"
                    )
                if time.time() > deadline:
                    raise ServiceUnavailableError(
                        f"model '{g.name}': its vLLM server is not ready after {timeout_s:.0f} s"
                    )
                time.sleep(0.5)

    def stop(self) -> None:
        for g in self.generators.values():
            g.engine.stop()

    def serves_vllm(self) -> bool:
        return any(isinstance(g.engine, VLLMEngine) for g in self.generators.values())

    def canonical(self, name: str) -> str:
        return self.aliases.get(name, name)

    def resolve_generator(self, name: str) -> tuple[ServedGenerator, str | None]:
        """The served generator behind a model id, and the LoRA adapter to apply (None: the base)."""
        key = self.canonical(name)
        if key in self.generators:
            return self.generators[key], None
        if key in self.adapters:
            return self.generators[self.adapters[key][0]], key
        if self._load_fine_tuned(key):
            return self.generators[self.adapters[key][0]], key
        if key in self.embedders:
            raise InvalidRequestError(
                f"'{name}' is an embedding model; it cannot generate text. Use it with /v1/embeddings.", "model"
            )
        raise ModelNotFoundError(name)

    def resolve_embedder(self, name: str) -> ServedEmbedder:
        key = self.canonical(name)
        if key in self.embedders:
            return self.embedders[key]
        if key in self.generators:
            raise InvalidRequestError(
                f"'{name}' is a generation model; /v1/embeddings needs an embedding model such as all-minilm-l6-v2.",
                "model",
            )
        raise ModelNotFoundError(name)

    def model_ids(self) -> list[tuple[str, int]]:
        """Every id a client may use, served names first, then aliases, then fine-tuned models
        (read from the source on every call, so a job that just succeeded is listed at once)."""
        served: dict[str, ServedGenerator | ServedEmbedder] = {**self.generators, **self.embedders}
        created = {n: m.created for n, m in served.items()}
        created.update({n: c for n, (_, c) in self.adapters.items() if n not in self._fine_tuned_loaded})
        ids = list(created.items())
        ids += [(a, created[t]) for a, t in self.aliases.items()]
        ids += [(m["id"], m["created"]) for m in self._servable_fine_tuned()]
        return ids

    # ---- fine-tuned models -----------------------------------------------------------------

    def _servable_fine_tuned(self) -> list[dict]:
        if self.fine_tuned is None:
            return []
        return [
            m
            for m in self.fine_tuned.fine_tuned_models()
            if m["base_model"] in self.generators and Path(m["path"]).is_dir()
        ]

    def sync_fine_tuned(self) -> list[str]:
        """Load every fine-tuned model (not checkpoints) of a vLLM-served base that is not loaded
        yet, so vLLM serves it the moment its job succeeds and again after a restart of either
        server; fundament's own engine loads adapters on first use instead. The ids loaded."""
        loaded = []
        for m in self._servable_fine_tuned():
            base = self.generators[m["base_model"]].engine
            if m["kind"] != "model" or not isinstance(base, VLLMEngine) or not base.ready or m["id"] in self.adapters:
                continue
            if time.time() < self._sync_failed.get(m["id"], 0.0):
                continue
            try:
                if self._load_fine_tuned(m["id"]):
                    loaded.append(m["id"])
            except Exception as e:  # a bad adapter must not stop the others; a request names it
                self._sync_failed[m["id"]] = time.time() + 60.0  # tried again in a minute, not every second
                log.error("fine-tuned model %s could not be loaded into vLLM: %s", m["id"], e)
        return loaded

    def is_fine_tuned(self, name: str) -> bool:
        return self.fine_tuned is not None and self.fine_tuned.fine_tuned_model(self.canonical(name)) is not None

    def _load_fine_tuned(self, key: str) -> bool:
        """Load a fine-tuned model's adapter into its base engine on first use; False if unknown."""
        if self.fine_tuned is None:
            return False
        m = self.fine_tuned.fine_tuned_model(key)
        if m is None or m["base_model"] not in self.generators or not Path(m["path"]).is_dir():
            return False
        with self._lock:
            if key not in self.adapters:
                self.generators[m["base_model"]].engine.load_adapter(key, m["path"])
                self.adapters[key] = (m["base_model"], m["created"])
                self._fine_tuned_loaded.add(key)
                log.info("loaded fine-tuned model %s from %s", key, m["path"])
        return True

    def delete_model(self, name: str) -> str:
        """Delete a fine-tuned model (its adapter files and, for a job's model, its checkpoints);
        base models, aliases and configured adapters cannot be deleted."""
        if (
            name in self.aliases
            or name in self.generators
            or name in self.embedders
            or (name in self.adapters and name not in self._fine_tuned_loaded)
        ):
            kind = (
                "an alias"
                if name in self.aliases
                else "a configured adapter"
                if name in self.adapters
                else "a base model"
            )
            raise InvalidRequestError(f"'{name}' is {kind}; only fine-tuned models (ft:...) can be deleted.", "model")
        source = self.fine_tuned
        m = source.delete_fine_tuned_model(name) if source is not None else None
        if source is None or m is None:
            raise ModelNotFoundError(name)
        with self._lock:
            gone = [
                a for a in self._fine_tuned_loaded if a == name or (m["kind"] == "model" and a.startswith(name + ":"))
            ]
            for a in gone:
                self.remove_adapter(a)
                self._fine_tuned_loaded.discard(a)
        source.discard_fine_tuned_files(m)  # unloaded first: nothing reads them any more
        return name
