"""PEFT LoRA adapters for the Llama model, prepared for multi-adapter batches (S-LoRA/Punica style).

Reads a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) and folds each
layer's per-projection A and B into one (A, B) pair per fused projection of LlamaModel (q|k|v and
gate|up): A stacked (sum r, in), B block-diagonal (out, sum r) with the LoRA scale folded in, so a
group of rows costs two small matmuls per projection whatever the targets.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import InvalidRequestError

# PEFT module name -> (our fused projection, part index within it)
FUSED: dict[str, tuple[str, int | None]] = {
    "q_proj": ("qkv", 0),
    "k_proj": ("qkv", 1),
    "v_proj": ("qkv", 2),
    "o_proj": ("o", 0),
    "gate_proj": ("gate_up", 0),
    "up_proj": ("gate_up", 1),
    "down_proj": ("down", 0),
    # Phi-3's own fused projections: the whole of ours (part None)
    "qkv_proj": ("qkv", None),
    "gate_up_proj": ("gate_up", None),
}
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.lora_([AB])(?:\.default)?\.weight$")


def read_adapter_config(path: Path) -> dict:
    cfg_file = path / "adapter_config.json"
    if not cfg_file.exists():
        raise InvalidRequestError(f"{path} is not a PEFT adapter directory (no adapter_config.json)", "model")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise InvalidRequestError(f"{path}: only LoRA adapters are supported, not {cfg.get('peft_type')}", "model")
    for key, ok in (("use_dora", False), ("modules_to_save", None)):
        if cfg.get(key) not in (ok, [], None if ok is None else ok):
            raise InvalidRequestError(f"{path}: adapters with {key}={cfg.get(key)!r} are not supported", "model")
    if cfg.get("bias", "none") != "none":
        raise InvalidRequestError(f"{path}: adapters that train biases are not supported", "model")
    return cfg


def load_lora(
    path: str | Path, out_sizes: dict[str, list[int]], n_layers: int, dtype: torch.dtype, device
) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Per layer: {fused projection: (A (R, in), B_scaled (out, R))}. out_sizes gives each fused
    projection's part sizes, e.g. {"qkv": [q_dim, kv_dim, kv_dim], ...}."""
    path = Path(path)
    cfg = read_adapter_config(path)
    files = list(path.glob("adapter_model.safetensors"))
    if not files:
        raise InvalidRequestError(f"{path}: no adapter_model.safetensors", "model")
    r = cfg["r"]
    scale = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in load_file(files[0]).items():
        m = _KEY.search(key)
        if not m:
            raise InvalidRequestError(
                f"{path}: unsupported adapter weight {key} (LoRA on attention and MLP projections only)", "model"
            )
        layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
        if module not in FUSED or layer >= n_layers:
            raise InvalidRequestError(f"{path}: adapter weight {key} does not fit this model", "model")
        parts.setdefault((layer, module), {})[ab] = t.float()
    layers: list[dict] = [{} for _ in range(n_layers)]
    grouped: dict[tuple[int, str], list[tuple[int | None, torch.Tensor, torch.Tensor]]] = {}
    for (layer, module), w in parts.items():
        fused, idx = FUSED[module]
        grouped.setdefault((layer, fused), []).append((idx, w["A"], w["B"]))
    for (layer, fused), items in grouped.items():
        sizes = out_sizes[fused]
        ordered = sorted(((idx, a, b) for idx, a, b in items if idx is not None), key=lambda x: x[0])
        if len(ordered) < len(items):  # a fused module's adapter (Phi-3's) spans all its parts
            if len(items) > 1:
                raise InvalidRequestError(f"{path}: layer {layer} adapts {fused} both whole and in parts", "model")
            sizes, ordered = [sum(sizes)], [(0, items[0][1], items[0][2])]
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        R = sum(a.shape[0] for _, a, _ in ordered)
        A = torch.cat([a for _, a, _ in ordered])
        B = torch.zeros(sum(sizes), R)
        col = 0
        for idx, a, b in ordered:
            if b.shape[0] != sizes[idx]:
                raise InvalidRequestError(
                    f"{path}: layer {layer} has a LoRA B of {b.shape[0]} rows, the model needs {sizes[idx]}", "model"
                )
            B[offsets[idx] : offsets[idx] + sizes[idx], col : col + a.shape[0]] = b * scale
            col += a.shape[0]
        layers[layer][fused] = (
            A.to(dtype=dtype, device=device).contiguous(),
            B.to(dtype=dtype, device=device).contiguous(),
        )
    return layers
