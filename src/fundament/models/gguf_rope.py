"""The rotary embedding's scaling of a GGUF file, which transformers' GGUF reader drops: it keeps the
base frequency but not `{arch}.rope.scaling.*` (linear, YaRN: Gemma 3's global layers, long-context
fine-tunes) nor Llama 3.x's `rope_freqs` tensor (its per-frequency factors). Without them a
dequantized model computes other rotary angles than the file's model: here they go back into the
config, in transformers' own terms, so the engine and the trainer both read them."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

log = logging.getLogger("fundament.models")


def restore_rope_scaling(gguf: Path, cfg: dict) -> dict:
    """`cfg` (a config.json as transformers' GGUF reader wrote it) with the file's rotary scaling."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf)
    arch = reader.fields["general.architecture"].contents()

    def get(key: str):
        field = reader.fields.get(f"{arch}.{key}")
        return field.contents() if field is not None else None

    params = dict(cfg.get("rope_parameters") or {})
    by_layer_type = bool(params) and all(isinstance(v, dict) for v in params.values())  # Gemma 3's
    # the table the scaling applies to: the global layers' where tables differ by layer type
    target = dict(params.get("full_attention", {})) if by_layer_type else params
    if target.get("rope_type", "default") != "default":
        return cfg  # the reader kept it
    kind, factor = get("rope.scaling.type"), get("rope.scaling.factor")
    if kind in ("linear", "yarn") and factor and float(factor) != 1.0:
        target.update(rope_type=kind, factor=float(factor))
        if kind == "yarn" and get("rope.scaling.original_context_length"):
            target["original_max_position_embeddings"] = int(get("rope.scaling.original_context_length"))
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None and kind in (None, "none"):
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        theta = target.get("rope_theta", cfg.get("rope_theta", 10000.0))
        llama3 = llama3_parameters(np.asarray(freqs.data, dtype=np.float64).reshape(-1), head_dim, theta)
        if llama3 is None:
            log.warning("%s: its rope_freqs are not Llama 3.x's rotary scaling; served without them", gguf)
        else:
            target.update(llama3)
    if by_layer_type:
        params["full_attention"] = target
    cfg["rope_parameters"] = params if by_layer_type else target
    return cfg


def llama3_parameters(factors: np.ndarray, head_dim: int, theta: float) -> dict | None:
    """Llama 3.x's rope parameters from the per-frequency factors llama.cpp's converter stored (1 for
    high frequencies, `factor` for low ones, a smooth step between), or None where none reproduce
    them. Only the wavelength bounds are determined, so low_freq_factor is taken as 1, as every
    Llama 3.x has: original_max_position_embeddings and high_freq_factor follow from the steps."""
    wavelengths = 2 * math.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    factor = float(factors.max())
    if len(factors) != len(wavelengths) or factor <= 1.0:
        return None
    ones, full = np.isclose(factors, 1.0, rtol=1e-6), np.isclose(factors, factor, rtol=1e-6)
    medium = ~ones & ~full
    if medium.sum() >= 2:  # smooth = (original / wavelength - low) / (high - low), with low = 1
        smooth = (1 / factors[medium] - 1 / factor) / (1 - 1 / factor)
        a = np.stack([1 / wavelengths[medium], -smooth], axis=1)
        original, high = np.linalg.lstsq(a, 1 - smooth, rcond=None)[0]
    else:  # no step between: any bounds between the last 1 and the first `factor` give these factors
        last_one = wavelengths[ones].max() if ones.any() else wavelengths.min() / 2
        first_full = wavelengths[full].min()
        original = first_full * 0.999
        high = original / max(last_one * 1.001, (wavelengths[medium].max() if medium.any() else 0) * 1.001)
    near = round(float(original))  # a config's own value is a whole number of tokens
    params = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": round(float(high), 6),
        "original_max_position_embeddings": near if abs(original - near) < 1e-3 * original else float(original),
    }
    again = _llama3_factors(wavelengths, params)
    return params if np.allclose(again, factors, rtol=1e-5) else None


def _llama3_factors(wavelengths: np.ndarray, p: dict) -> np.ndarray:
    """llama.cpp's converter's factors for these parameters (transformers' llama3 scaling, inverted)."""
    original, factor = p["original_max_position_embeddings"], p["factor"]
    low, high = p["low_freq_factor"], p["high_freq_factor"]
    smooth = (original / wavelengths - low) / (high - low)
    out = 1 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelengths < original / high, 1.0, out)
    return np.where(wavelengths > original / low, factor, out)
