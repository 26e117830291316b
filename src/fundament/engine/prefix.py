"""Prefix caching: the keys and values of recent prompts, kept so that a new prompt that starts
with the same tokens (a shared system prompt, a chat's earlier turns, few-shot examples) copies
them instead of computing them again. Only used where the model computes every plain row alone
(`LlamaModel.rows_alone`): there a copied key or value is bit for bit the one the new request would
have computed, so caching never changes an output, only the time to the first token.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..models.llama import KVCache

BLOCK = 16  # tokens per hashed block of the index


@dataclass
class _Entry:
    adapter: str
    ids: tuple[int, ...]
    k: torch.Tensor  # (L, KVH, len(ids), hd)
    v: torch.Tensor
    hashes: list[int]  # the chained hash of each full block of ids (the index's keys)


def block_hashes(ids: list[int] | tuple[int, ...]) -> list[int]:
    """The chained hash of each full block of BLOCK tokens: the j-th stands for ids[: BLOCK (j + 1)]."""
    out, h = [], 0
    for j in range(0, len(ids) - BLOCK + 1, BLOCK):
        h = hash((h, tuple(ids[j : j + BLOCK])))
        out.append(h)
    return out


def common_prefix(a: tuple[int, ...], b: list[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = min(len(a), len(b))
    if tuple(b[:n]) == a[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]: bisect on slice equality (C speed)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if tuple(b[lo:mid]) == a[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class PrefixCache:
    """Least recently used prompts' keys and values, per adapter (a LoRA changes them: the engine
    names each load of one by a key of its own), holding at most `max_tokens` tokens in all. An
    index of chained block hashes finds the cached prompt sharing the most whole blocks of
    BLOCK tokens with a new one in time linear in its length, whatever the number cached; the
    tokens themselves are then compared (a hash only proposes). Used from the engine thread only."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.tokens = 0
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._index: dict[tuple[str, int], int] = {}  # (adapter, block hash) -> the newest entry holding it
        self._keys = 0
        self.queries = 0  # prompt tokens looked up (vLLM's prefix_cache_queries)
        self.hits = 0  # of those, tokens copied from the cache (vLLM's prefix_cache_hits)

    def _find(self, adapter: str, prompt_ids: list[int], hashes: list[int]) -> tuple[int | None, int]:
        """The cached prompt sharing the most whole blocks with `prompt_ids`, and how many tokens
        it shares; or one shorter than a block it equals the start of."""
        for h in reversed(hashes):
            key = self._index.get((adapter, h))
            if key is not None:
                return key, common_prefix(self._entries[key].ids, prompt_ids)
        return None, 0

    def load(self, adapter: str, prompt_ids: list[int], cache: KVCache) -> int:
        """Copy the longest cached prefix of `prompt_ids` into `cache` (its slots 0..n-1) and return
        n, the tokens that need no computing. The last prompt token is always left to compute:
        its logits start the completion."""
        self.queries += len(prompt_ids)
        key, shared = self._find(adapter, prompt_ids, block_hashes(prompt_ids))
        n = min(shared, len(prompt_ids) - 1)
        if key is None or n <= 0:
            return 0
        e = self._entries[key]
        self._entries.move_to_end(key)
        cache.reserve(n)
        cache.k[:, :, :n] = e.k[:, :, :n]
        cache.v[:, :, :n] = e.v[:, :, :n]
        self.hits += n
        return n

    def store(self, adapter: str, prompt_ids: list[int], cache: KVCache) -> None:
        """Keep a prompt's keys and values (all computed in `cache`), unless the cached prompt it
        shares most with already starts with it; that one is dropped if this one extends it."""
        n = len(prompt_ids)
        if n < BLOCK or n > self.max_tokens:
            return
        hashes = block_hashes(prompt_ids)
        key, shared = self._find(adapter, prompt_ids, hashes)
        if key is not None:
            if shared == n:  # already held
                self._entries.move_to_end(key)
                return
            if shared == len(self._entries[key].ids):
                self._drop(key)
        while self._entries and self.tokens + n > self.max_tokens:
            self._drop(next(iter(self._entries)))
        self._keys += 1
        self._entries[self._keys] = _Entry(
            adapter, tuple(prompt_ids), cache.k[:, :, :n].clone(), cache.v[:, :, :n].clone(), hashes
        )
        for h in hashes:
            self._index[(adapter, h)] = self._keys
        self.tokens += n

    def _drop(self, key: int) -> None:
        e = self._entries.pop(key)
        for h in e.hashes:
            if self._index.get((e.adapter, h)) == key:
                del self._index[(e.adapter, h)]
        self.tokens -= len(e.ids)
