"""The native decode kernel (csrc/decode.cpp): built with the machine's C++ compiler on first use,
kept in a cache beside fundament's other caches, loaded once per process. `load()` says whether it
is there; without a compiler the engine runs the same steps through PyTorch calls in Python."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import torch

from .device import cpu_flags

log = logging.getLogger(__name__)
SOURCE = Path(__file__).parent / "csrc" / "decode.cpp"
# included by SOURCE: part of the build's key
HEADERS = [
    Path(__file__).parent / "csrc" / h
    for h in ("qgemm.h", "qgemm_amx.h", "qgemm_i8.h", "qgemm_i8_amx.h", "qgemm_f32.h", "attend.h", "team.h")
]
# Vectorized float reductions (attention's dot products and sums) need reassociation; the order
# is still fixed at compile time, so a row's result never depends on its batch.
# -fopenmp: at::parallel_for is a header template that splits work with OpenMP pragmas; without
# it, it runs on one thread. The library then needs libgomp.so.1, which resolves to the copy torch
# has already loaded, so there is one OpenMP pool in the process.
CFLAGS = [
    "-O3",
    "-march=native",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fassociative-math",
    "-fno-signed-zeros",
    "-fopenmp",
]
STALE_LOCK_S = 300
_lock = threading.Lock()
_loaded: bool | None = None  # load()'s answer, once asked


def cache_dir() -> Path:
    """One build per machine, torch version, CPU and source: ~/.cache/fundament/kernels/<key>."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fundament" / "kernels"
    flags = " ".join(sorted(cpu_flags()))  # -march=native builds for them
    key = hashlib.sha256(
        b"\0".join(
            x.encode()
            for x in (SOURCE.read_text(), *(h.read_text() for h in HEADERS), torch.__version__, flags, " ".join(CFLAGS))
        )
    ).hexdigest()[:16]
    return root / key


def _put_ninja_on_path() -> None:
    """torch runs `ninja` from PATH; the ninja wheel (a dependency) puts it in the environment's
    bin folder, which is not on PATH when fundament runs as .venv/bin/fundament."""
    try:
        import ninja
    except ImportError:
        return
    path = os.environ.get("PATH", "")
    if ninja.BIN_DIR not in path.split(os.pathsep):
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path


def load() -> bool:
    """Build (once per machine) and load the kernel; False, with one warning, if it cannot be.
    Decided once per process."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _build()
        return _loaded


def _build() -> bool:
    if os.environ.get("FUNDAMENT_NATIVE", "1") == "0":
        return False
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        log.warning(
            "native decode kernel unavailable: no C++ compiler (%s) on PATH; decoding through PyTorch calls instead",
            compiler,
        )
        return False
    try:
        from torch.utils.cpp_extension import load as build

        _put_ninja_on_path()
        where = cache_dir()
        where.mkdir(parents=True, exist_ok=True)
        # torch's build lock: a build killed midway (Ctrl-C at first start) leaves it behind, and
        # torch would then wait on it forever. A build takes ~10 s; older is stale.
        lock = where / "lock"
        if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink(missing_ok=True)
        if not (where / "fundament_decode.so").exists():
            log.info("building the native decode kernel (once per machine) in %s", where)
        build(
            name="fundament_decode",
            sources=[str(SOURCE)],
            extra_cflags=CFLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(where),
            is_python_module=False,
            verbose=False,
        )
        return True
    except Exception as e:  # no ninja, a failed build: run without it
        log.warning(
            "native decode kernel unavailable (%s: %s); decoding through PyTorch calls instead",
            type(e).__name__,
            str(e).splitlines()[0] if str(e) else "",
        )
        return False
