"""Where a server's large, changing buffers live, so that its resident memory follows what it holds:
KV caches in pages of their own, and the heap's free pages handed back after loading. Knows torch,
mmap and glibc's malloc; nothing of models or requests."""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import mmap

import torch


def outside_heap(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized CPU tensor in anonymous pages of its own, given back to the OS when the
    tensor is freed. KV caches grow by copying into a larger buffer: from malloc's heap the freed
    ones leave holes of several MB that later, smaller blocks pin, and a server's resident memory
    then keeps growing past what it holds (glibc raises its mmap threshold to the size of every
    buffer freed, so such sizes stay on the heap). Pages are touched, so made resident, only when
    written, as with `torch.empty`."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    # Private: Python's default for anonymous maps is MAP_SHARED, memory that a forked child would
    # write through to. The tensor keeps the mmap alive; munmap runs when its last view is freed.
    pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(pages, dtype=dtype).view(shape)


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def release_free_memory() -> bool:
    """Hand the heap's free pages back to the OS (glibc's `malloc_trim`, which also releases whole
    free pages inside the heap, not only at its top). Loading a model frees hundreds of MB of
    temporaries that would otherwise stay resident for the life of the server. False where the C
    library has no malloc_trim (musl, macOS): nothing is done there."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is None:
        return False
    trim(0)
    return True
