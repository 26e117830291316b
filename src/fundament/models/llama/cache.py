"""Each sequence's KV cache, and the segments of the flat batch that say which cache each run of
tokens reads and writes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..memory import outside_heap
from .config import LlamaConfig


class KVCache:
    """One sequence's keys and values for every layer, grown in blocks as the sequence lengthens,
    never past `limit` tokens (what the engine reserved for it), so the engine's memory bound is
    a bound on what is really allocated."""

    BLOCK = 256

    def __init__(self, cfg: LlamaConfig, dtype: torch.dtype, device: torch.device, limit: int):
        self.cfg, self.dtype, self.device, self.limit = cfg, dtype, device, limit
        self.capacity = 0
        # (L, KVH, cap, hd): nothing allocated until the first reserve
        self.k = self.v = torch.empty(self._shape(0), dtype=dtype, device=device)

    def _shape(self, cap: int) -> tuple[int, int, int, int]:
        c = self.cfg
        return (c.num_hidden_layers, c.num_key_value_heads, cap, c.head_dim)

    @staticmethod
    def bytes_per_token(cfg: LlamaConfig, dtype: torch.dtype) -> int:
        return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * torch.finfo(dtype).bits // 8

    def reserve(self, n_tokens: int) -> None:
        if n_tokens <= self.capacity:
            return
        cap = min(self.limit, -(-max(n_tokens, int(self.capacity * 1.5)) // self.BLOCK) * self.BLOCK)
        assert cap >= n_tokens, "a sequence outgrew its reservation"
        shape = self._shape(cap)
        # empty, not zeros: attention reads only written positions, and untouched capacity then
        # stays out of resident memory. On the CPU outside malloc's heap: see memory.outside_heap.
        if self.device.type == "cpu":
            k, v = outside_heap(shape, self.dtype), outside_heap(shape, self.dtype)
        else:
            k = torch.empty(shape, dtype=self.dtype, device=self.device)
            v = torch.empty(shape, dtype=self.dtype, device=self.device)
        if self.capacity:
            k[:, :, : self.capacity] = self.k
            v[:, :, : self.capacity] = self.v
        self.k, self.v, self.capacity = k, v, cap

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


@dataclass
class Segment:
    """A run of consecutive tokens of one sequence inside the flat batch."""

    cache: Any  # the sequence's cache: a KVCache here, a TransformersCache on the transformers fallback
    start: int  # cache slot of the first token (slots before it are filled)
    length: int
    adapter: int | None = None  # LoRA adapter slot, None for the base model
    # A token tree packed into the cache (engine scoring requests): each token's position (its
    # depth, for the rotary embedding) and which cache slots it attends to, (length, start +
    # length) bool. None: a plain causal run, where position = slot.
    positions: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    # A token tree's positions of every cache slot up to this segment's end (start + length), for
    # attention windows, which count positions, not slots (Gemma's sliding layers). None: slots.
    key_positions: torch.Tensor | None = None
    # A generated token fed back (not a prompt's): a float32 model with engine.int8_activations
    # multiplies its rows as int8 copies (LlamaModel.forward), prompts' rows stay float32.
    generated: bool = False

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this segment's keys and values (length, KVH, hd) of one layer into its cache
        slots; that layer's whole cache (KVH, cap, hd) for keys and for values."""
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        kc[:, self.start : self.start + self.length] = k.transpose(0, 1)
        vc[:, self.start : self.start + self.length] = v.transpose(0, 1)
        return kc, vc

    @property
    def is_plain(self) -> bool:
        """A causal run of tokens, not a token tree."""
        return self.mask is None and self.positions is None

    @property
    def is_decode(self) -> bool:
        """One plain token: it runs through the decode kernels."""
        return self.length == 1 and self.mask is None
