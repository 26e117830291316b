"""Resident memory follows what the server holds: KV caches live in pages of their own, unmapped
when a cache grows into a larger buffer, and the heap's free pages go back to the OS after
loading. Checked against the kernel's own accounts (/proc/self/maps and status), on Linux."""

from __future__ import annotations

import ctypes
import sys

import pytest
import torch

from fundament.models.llama import KVCache
from fundament.models.llama.config import LlamaConfig
from fundament.models.memory import outside_heap, release_free_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")

CFG = LlamaConfig(
    vocab_size=16,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    head_dim=64,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    attention_bias=False,
)


def mappings() -> list[tuple[int, int, str]]:
    """(start, end, name) of every mapping of this process; name is '' for anonymous ones."""
    out = []
    for line in open("/proc/self/maps"):
        fields = line.split()
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        out.append((lo, hi, fields[5] if len(fields) > 5 else ""))
    return out


def mapping_of(address: int) -> tuple[int, int, str] | None:
    return next((m for m in mappings() if m[0] <= address < m[1]), None)


def rss_anon_kb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise AssertionError("no RssAnon in /proc/self/status")


def test_a_kv_caches_pages_are_its_own_and_go_back_to_the_os_when_it_grows():
    cache = KVCache(CFG, torch.bfloat16, torch.device("cpu"), 2048)
    cache.reserve(256)
    per_buffer = 4 * 2 * 256 * 64 * 2  # layers, kv heads, capacity, head dim, bytes: 256 KB
    assert cache.k.nbytes == per_buffer
    old = [t.data_ptr() for t in (cache.k, cache.v)]
    for address in old:
        lo, hi, name = mapping_of(address)
        assert name == "", f"a KV cache buffer lies in {name}, not in pages of its own"
        assert address % 4096 == 0
    cache.k[:, :, :200] = torch.arange(200, dtype=torch.bfloat16)[:, None]
    cache.v[:, :, :200] = -torch.arange(200, dtype=torch.bfloat16)[:, None]

    cache.reserve(300)  # grows to 512 slots: a copy into new pages, the old ones unmapped
    assert cache.capacity == 512
    new = [(t.data_ptr(), t.data_ptr() + t.nbytes) for t in (cache.k, cache.v)]
    for address in old:  # unmapped, or reused by the kernel for one of the new buffers
        assert mapping_of(address) is None or any(lo <= address < hi for lo, hi in new), "old buffer still mapped"
    assert torch.equal(cache.k[:, :, :200, 0], torch.arange(200, dtype=torch.bfloat16).expand(4, 2, 200))
    assert torch.equal(cache.v[:, :, :200, 5], -torch.arange(200, dtype=torch.bfloat16).expand(4, 2, 200))


def test_outside_heap_touches_no_page_until_written():
    before = rss_anon_kb()
    t = outside_heap((64, 1024, 1024), torch.bfloat16)  # 128 MB
    assert rss_anon_kb() - before < 16 * 1024
    t[:8] = 1  # 16 MB written: resident now
    grown = rss_anon_kb() - before
    assert 15 * 1024 <= grown < 40 * 1024
    assert t.shape == (64, 1024, 1024) and t.dtype == torch.bfloat16
    assert outside_heap((0, 3), torch.float32).shape == (0, 3)


@pytest.mark.skipif(not release_free_memory(), reason="the C library has no malloc_trim")
def test_release_free_memory_hands_back_the_free_pages_inside_the_heap():
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    # 2,000 blocks of 64 KB (under glibc's mmap threshold: on the heap), each written so resident;
    # all but the last freed, which pins the heap's top so that free() itself cannot shrink it.
    blocks = [libc.malloc(64 * 1024) for _ in range(2000)]
    assert all(blocks)
    for b in blocks:
        ctypes.memset(b, 1, 64 * 1024)
    for b in blocks[:-1]:
        libc.free(b)
    held = rss_anon_kb()
    assert release_free_memory()
    released = held - rss_anon_kb()
    libc.free(blocks[-1])
    assert released > 100 * 1024, f"only {released} KB of ~125 MB of free heap pages went back"
