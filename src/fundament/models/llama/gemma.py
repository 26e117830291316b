"""Gemma 2/3's attention for the engine's PyTorch path: transformers' eager attention (its query
scale, Gemma 2's soft-capped scores, each layer's sliding window), per decode row and per prompt
segment over the sequence's own cache, so a row's result never depends on its batch."""

from __future__ import annotations

import torch

from .cache import Segment
from .config import LlamaConfig


def gemma_attention(cfg: LlamaConfig, li: int, q, k, v, segments: list[Segment], dec_views) -> torch.Tensor:
    """attention.attention as Gemma computes it (transformers' eager attention): its query scale, Gemma
    2's soft-capped scores, and this layer's sliding window (a query sees its last `window`
    positions). Per row for decode rows and per segment for prompts, so batch-invariant."""
    H, KVH, hd = q.shape[1], k.shape[1], q.shape[2]
    G = H // KVH
    window = cfg.windows[li] if cfg.windows else None
    scaling = (cfg.query_scale, cfg.attn_softcap)
    attn = torch.empty_like(q)
    for i, (k_at, v_at, ks, vs) in enumerate(dec_views):
        k_at[li] = k[i]
        v_at[li] = v[i]
        kk, vv = ks[li][0].to(q.dtype), vs[li][0].to(q.dtype)  # (KVH, len, hd), float32 from a bf16 cache
        if window:
            kk, vv = kk[:, -window:], vv[:, -window:]
        attn[i] = eager_attention(q[i].view(KVH, G, hd), kk, vv, None, *scaling).reshape(H, hd)
    n_dec = len(dec_views)  # the decode rows come first
    off = n_dec
    for s in segments[n_dec:]:
        end = s.start + s.length
        kc, vc = s.store(li, k[off : off + s.length], v[off : off + s.length])  # (KVH, cap, hd)
        if s.mask is not None:  # a token tree: its mask, and the window over positions (depths)
            allowed = s.mask.to(q.device)
            key_pos = s.key_positions if s.key_positions is not None else torch.arange(end)
            q_pos = key_pos[s.start : end]
        else:
            allowed = torch.ones(s.length, end, dtype=torch.bool, device=q.device).tril(diagonal=s.start)
            key_pos, q_pos = torch.arange(end), torch.arange(s.start, end)
        if window:
            allowed = allowed & (q_pos[:, None] - key_pos[None, :] < window).to(q.device)
        ks = kc[:, :end].to(q.dtype).repeat_interleave(G, dim=0)  # (H, end, hd)
        vs = vc[:, :end].to(q.dtype).repeat_interleave(G, dim=0)
        attn[off : off + s.length] = eager_attention(
            q[off : off + s.length].transpose(0, 1), ks, vs, allowed, *scaling
        ).transpose(0, 1)
        off += s.length
    return attn


def eager_attention(q, k, v, allowed, scale: float | None = None, softcap: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v as transformers' eager attention computes it (Gemma 2's scores
    capped as tanh(s / cap) * cap); serving and training (adapt/packed_attention.py) share it.
    q (..., n, hd), k and v (..., m, hd); `allowed` (n, m) or None (all); scale None: hd ** -0.5."""
    scores = (q @ k.transpose(-1, -2)) * (scale or q.shape[-1] ** -0.5)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1, dtype=torch.float32).to(q.dtype) @ v
