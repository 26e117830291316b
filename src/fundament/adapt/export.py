"""A model taken elsewhere: a fine-tuned adapter (or a base model alone) exported as a portable PEFT
directory, as a merged Hugging Face directory (transformers, vLLM), or as a GGUF with an Ollama
Modelfile (llama.cpp, Ollama). Knows PEFT and the file formats; which model a name means is the
caller's (registry.locate_model).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidRequestError

FORMATS = ("peft", "merged", "gguf")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "fundament_tune.json")


@dataclass
class ModelFiles:
    """What a served name is made of on disk."""

    name: str  # as asked (an ft: id, an adapter's or a base model's name)
    base_name: str  # the base model's name in fundament
    base_dir: Path  # its Hugging Face directory
    adapter_dir: Path | None  # the LoRA adapter, None for a base model
    gguf: Path | None  # the GGUF the base was loaded from, if it was
    hub_id: str | None  # the base model's name on the Hugging Face Hub, if known


def export_model(model: ModelFiles, fmt: str, out: Path, quantization: str = "f16") -> list[Path]:
    """Write `model` to `out` in `fmt`; the files written. `out` must not exist or be empty."""
    if fmt not in FORMATS:
        raise InvalidRequestError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}.", "format")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise InvalidRequestError(f"{out} exists and is not empty; export into a new directory.", "out")
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "peft":
        return _peft(model, out)
    if fmt == "merged":
        return _save_merged(model, out)
    return _gguf(model, out, quantization)


def _peft(model: ModelFiles, out: Path) -> list[Path]:
    """The adapter, its adapter_config.json naming the base so that another machine resolves it
    (its Hub id where known, so `PeftModel.from_pretrained(AutoModel...(hub id), out)` and vLLM's
    `--lora-modules` work), and fundament_export.json with where the base lives here."""
    if model.adapter_dir is None:
        raise InvalidRequestError(
            f"{model.name} is a base model: it has no adapter. Export it as merged or gguf.", "format"
        )
    written = []
    for name in ADAPTER_FILES:
        if (model.adapter_dir / name).exists():
            written.append(Path(shutil.copy2(model.adapter_dir / name, out / name)))
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = model.hub_id or model.base_name
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    written.append(_provenance(model, out, "peft"))
    return written


def _provenance(model: ModelFiles, out: Path, fmt: str, **more) -> Path:
    p = out / "fundament_export.json"
    p.write_text(
        json.dumps(
            {
                "model": model.name,
                "format": fmt,
                "base_model": model.base_name,
                "base_model_hub_id": model.hub_id,
                "base_model_local_dir": str(model.base_dir),
                "base_model_gguf": str(model.gguf) if model.gguf else None,
                **more,
            },
            indent=2,
        )
    )
    return p


def merged_model(model: ModelFiles):
    """The base with the adapter merged into its weights (float32), and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(str(model.base_dir), dtype=torch.float32)
    if model.adapter_dir is not None:
        from peft import PeftModel

        base = PeftModel.from_pretrained(base, str(model.adapter_dir)).merge_and_unload()
    return base.eval(), AutoTokenizer.from_pretrained(str(model.base_dir))


def _save_merged(model: ModelFiles, out: Path) -> list[Path]:
    """A transformers directory: config.json, model.safetensors, the tokenizer and chat template."""
    merged, tok = merged_model(model)
    merged.config.name_or_path = model.name
    merged.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    _provenance(model, out, "merged")
    return sorted(p for p in out.iterdir() if p.is_file())


def _gguf(model: ModelFiles, out: Path, quantization: str) -> list[Path]:
    """A GGUF of the merged weights in F16 or Q8_0, its metadata (tokenizer, chat template, special
    tokens) taken whole from the GGUF the base came from, and an Ollama Modelfile beside it."""
    from ..models.gguf_export import gguf_chat_template, ollama_modelfile, write_gguf

    if model.gguf is None:
        raise InvalidRequestError(
            f"{model.name}'s base was not loaded from a GGUF, so there is no tokenizer metadata to carry over. "
            "Export it as merged and convert that directory with llama.cpp's convert_hf_to_gguf.py.",
            "format",
        )
    merged, tok = merged_model(model)
    stem = model.name.replace(":", "-").replace("/", "-")
    path = write_gguf(model.gguf, merged.state_dict(), out / f"{stem}.{quantization}.gguf", quantization)
    template = gguf_chat_template(model.gguf)
    modelfile = out / "Modelfile"
    modelfile.write_text(ollama_modelfile(path.name, template, _default_system(tok)))
    _provenance(model, out, "gguf", quantization=quantization)
    return [path, modelfile, out / "fundament_export.json"]


def _default_system(tok) -> str | None:
    """The system prompt a chat template adds when a conversation has none (SmolLM2's does)."""
    marker = "\x00USER\x00"
    try:
        text = tok.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    except Exception:  # noqa: BLE001 - a template that needs more than this: no default to carry
        return None
    head = text.split(marker)[0]
    if "<|im_start|>system\n" in head:
        return head.split("<|im_start|>system\n", 1)[1].split("<|im_end|>", 1)[0] or None
    return None
