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


@dataclass
class _Entry:
    ids: tuple[int, ...]
    k: torch.Tensor  # (L, KVH, len(ids), hd)
    v: torch.Tensor


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
    names each load of one by a key of its own), holding at most `max_tokens` tokens in all. Used
    from the engine thread only."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.tokens = 0
        self._entries: OrderedDict[tuple[str, int], _Entry] = OrderedDict()
        self._keys = 0
        self.queries = 0  # prompt tokens looked up (vLLM's prefix_cache_queries)
        self.hits = 0  # of those, tokens copied from the cache (vLLM's prefix_cache_hits)

    def load(self, adapter: str, prompt_ids: list[int], cache: KVCache) -> int:
        """Copy the longest cached prefix of `prompt_ids` into `cache` (its slots 0..n-1) and return
        n, the tokens that need no computing. The last prompt token is always left to compute:
        its logits start the completion."""
        self.queries += len(prompt_ids)
        best, best_n = None, 0
        for key, e in self._entries.items():
            if key[0] == adapter:
                n = common_prefix(e.ids, prompt_ids)
                if n > best_n:
                    best, best_n = key, n
        n = min(best_n, len(prompt_ids) - 1)
        if best is None or n <= 0:
            return 0
        e = self._entries[best]
        self._entries.move_to_end(best)
        cache.reserve(n)
        cache.k[:, :, :n] = e.k[:, :, :n]
        cache.v[:, :, :n] = e.v[:, :, :n]
        self.hits += n
        return n

    def store(self, adapter: str, prompt_ids: list[int], cache: KVCache) -> None:
        """Keep a prompt's keys and values (all computed in `cache`), unless a cached prompt
        already starts with it; cached prompts it extends are dropped, as it holds theirs."""
        n = len(prompt_ids)
        if n < 2 or n > self.max_tokens:
            return
        for key, e in list(self._entries.items()):
            if key[0] != adapter:
                continue
            shared = common_prefix(e.ids, prompt_ids)
            if shared == n:  # already held
                self._entries.move_to_end(key)
                return
            if shared == len(e.ids):
                self._drop(key)
        while self._entries and self.tokens + n > self.max_tokens:
            self._drop(next(iter(self._entries)))
        self._keys += 1
        self._entries[(adapter, self._keys)] = _Entry(
            tuple(prompt_ids), cache.k[:, :, :n].clone(), cache.v[:, :, :n].clone()
        )
        self.tokens += n

    def _drop(self, key) -> None:
        self.tokens -= len(self._entries.pop(key).ids)
