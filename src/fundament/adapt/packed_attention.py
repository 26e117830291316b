"""Attention over a packed row: several examples trained as one sequence, each attending only to
itself, registered with transformers' attention interface under PACKED_ATTENTION. Knows tensors
and transformers' calling convention; not examples, labels or the loss.
"""

from __future__ import annotations

import torch

PACKED_ATTENTION = "fundament_packed"


def packed_layout(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """How a row of examples (lengths) maps to a padded batch (S examples, L = the longest): for
    each batch slot the row position it takes (padding repeats its example's first token), and
    for each row position its slot."""
    S, L = len(lengths), max(lengths)
    take: list[int] = []
    slots: list[int] = []
    start = 0
    for s, n in enumerate(lengths):
        take += list(range(start, start + n)) + [start] * (L - n)
        slots += range(s * L, s * L + n)
        start += n
    return torch.tensor(take), torch.tensor(slots), S, L


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, packed=None, **kwargs):
    """Attention for a packed row, as transformers' attention interface calls it: the examples are
    gathered into a padded batch and attend causally within themselves, one fused SDPA call. The
    same result as a block-diagonal mask over the whole row, at the cost of S * L^2 instead of
    T^2 and without a mask.
    query (1, H, T, D), key and value (1, KV heads, T, D); returns (1, T, H, D)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    take, slots, S, L = packed

    def batch(x):  # (1, h, T, D) -> (S, h, L, D)
        return x[0].index_select(1, take).unflatten(1, (S, L)).transpose(0, 1)

    softcap, window = kwargs.get("softcap"), kwargs.get("sliding_window")
    if softcap or window:  # Gemma's capped scores, a sliding window: what fused SDPA cannot do
        out = _capped_or_windowed(batch(query), batch(key), batch(value), scaling, softcap, window)
        return out.index_select(0, slots).unsqueeze(0), None
    # The math kernel: for examples of tens of tokens the CPU flash kernel's backward costs more
    # (a training step of SmolLM2-135M, 8 examples, was 8% faster with math).
    with sdpa_kernel([SDPBackend.MATH]):
        out = torch.nn.functional.scaled_dot_product_attention(
            batch(query),
            batch(key),
            batch(value),
            is_causal=True,
            scale=scaling,
            enable_gqa=query.shape[1] != key.shape[1],
        )  # (S, H, L, D); padded queries come after their example's tokens, so no real query sees them
    return out.transpose(1, 2).flatten(0, 1).index_select(0, slots).unsqueeze(0), None


def _capped_or_windowed(q, k, v, scaling, softcap, window) -> torch.Tensor:
    """Causal attention per example with soft-capped scores (tanh(s / cap) * cap, Gemma 2) and/or
    a sliding window (a query sees the last `window` positions), as transformers' eager attention
    computes them. q (S, H, L, D), k and v (S, KV heads, L, D); returns (S * L, H, D)."""
    from ..models.llama.gemma import eager_attention

    H, L = q.shape[1], q.shape[2]
    if k.shape[1] != H:
        k, v = (x.repeat_interleave(H // x.shape[1], dim=1) for x in (k, v))
    i = torch.arange(L, device=q.device)
    allowed = i[None, :] <= i[:, None]
    if window:
        allowed &= i[:, None] - i[None, :] < window
    return eager_attention(q, k, v, allowed, scaling, softcap).transpose(1, 2).flatten(0, 1)


def register_packed_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, lambda *args, **kwargs: None)  # no mask: the layout is the mask
