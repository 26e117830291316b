"""Where and in what precision a model runs: the CPU's bf16 support, `engine.device` and
`engine.dtype` resolved to a torch device and dtype. Knows torch and /proc/cpuinfo, nothing else."""

from __future__ import annotations

import functools
import platform

import torch

from ..errors import InvalidRequestError


@functools.cache
def _first_processor() -> dict[str, str]:
    """The first processor's block of /proc/cpuinfo as key -> value; empty where it cannot be read."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (avx512_bf16, amx_tile, ...); none where
    it cannot be read."""
    return frozenset(_first_processor().get("flags", "").split())


def cpu_name() -> str:
    """The CPU as /proc/cpuinfo names it, with its family and model numbers: a name such as "AMD
    EPYC" covers generations whose figures differ by 2x (families 25 and 26 both read so)."""
    info = _first_processor()
    name = info.get("model name") or platform.processor() or platform.machine()  # no /proc/cpuinfo: what Python knows
    return f"{name} (family {info.get('cpu family', '?')}, model {info.get('model', '?')})"


def cpu_supports_bf16() -> bool:
    """AVX512-BF16 (or AMX) makes bfloat16 matmuls fast; without it they are emulated and slow."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def resolve_device(name: str) -> str:
    """ "auto": the first CUDA GPU torch sees, else the CPU. A named CUDA device that is not there
    is a configuration error, not a silent fall back to the CPU."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InvalidRequestError(
            f"engine.device {name!r} is not a device; use auto, cpu or cuda[:N].", "device"
        ) from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise InvalidRequestError(
            f"engine.device is {name!r} but torch sees {torch.cuda.device_count()} CUDA devices.", "device"
        )
    if device.type not in ("cpu", "cuda"):
        raise InvalidRequestError(f"engine.device {name!r}: only cpu and cuda are supported.", "device")
    return str(device)


def resolve_kv_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """`engine.kv_cache_dtype` for a model of `model_dtype` (see config.EngineConfig)."""
    return torch.bfloat16 if name == "auto" and model_dtype == torch.float32 else model_dtype


def resolve_dtype(name: str, device: str = "cpu") -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device != "cpu" or cpu_supports_bf16() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
