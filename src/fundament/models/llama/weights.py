"""Safetensors weights read one tensor at a time with plain file reads (no mmap), so a float32
checkpoint never sits in memory beside its converted copy."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import Protocol

import torch

_ST_DTYPES = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "I32": torch.int32,
    "I64": torch.int64,
}


class Weights(Protocol):
    """What a model takes its tensors from, each once: a dict of tensors, or _LazyWeights."""

    def pop(self, name: str, /) -> torch.Tensor: ...

    def __contains__(self, name: str, /) -> bool: ...


class _LazyWeights:
    """Safetensors tensors read one at a time (`pop`) with plain file reads. safe_open would mmap
    the file, and every page it touches counts toward the process's resident memory until the
    end, so a float32 checkpoint would sit beside its converted copy (+540 MB peak here)."""

    def __init__(self, files: list[Path]):
        self._where: dict[str, tuple[Path, int, torch.dtype, list[int]]] = {}
        self._files: dict[Path, io.BufferedReader] = {}  # open handles, one per file, closed after its last tensor
        for f in files:
            with open(f, "rb") as fh:
                n = struct.unpack("<Q", fh.read(8))[0]
                header = json.loads(fh.read(n))
            for name, meta in header.items():
                if name != "__metadata__":
                    self._where[name] = (f, 8 + n + meta["data_offsets"][0], _ST_DTYPES[meta["dtype"]], meta["shape"])

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def pop(self, name: str) -> torch.Tensor:
        f, offset, dtype, shape = self._where.pop(name)
        fh = self._files.get(f) or self._files.setdefault(f, open(f, "rb"))
        t = torch.empty(shape, dtype=dtype)
        fh.seek(offset)
        fh.readinto(t.view(torch.uint8).numpy().data.cast("B"))
        if not any(w[0] == f for w in self._where.values()):
            self._files.pop(f).close()  # last tensor of this file read
        return t
