"""Attention for the engine's PyTorch path (Llama-style models; Gemma's: gemma.py): decode rows
one by one over their own keys, prompt segments over their own cache, so a row's result never
depends on its batch. The native kernel (csrc/decode.cpp) has its own."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cache import Segment


def attention(li: int, q, k, v, segments: list[Segment], n_dec: int, dec_views) -> torch.Tensor:
    """Causal attention of every segment over its own cache (after writing this step's k, v).
    q: (N, H, hd), k and v: (N, KVH, hd). Decode rows (the first n_dec) run as one batch."""
    H, KVH, hd = q.shape[1], k.shape[1], q.shape[2]
    G = H // KVH
    attn = torch.empty_like(q)
    # Decode rows: views prepared once per forward (`dec_views`), so each row costs a few
    # tensor calls per layer; at 16 streams these Python calls are a large part of a step.
    for i, (k_at, v_at, _, _) in enumerate(dec_views):
        k_at[li] = k[i]
        v_at[li] = v[i]
    # A decode row is one query, so the G query heads sharing a kv head ride as G "positions"
    # of one head: plain SDPA, no GQA expansion (measured 3-6x faster than enable_gqa in
    # bfloat16 on CPU); query head h reads kv head h // G. One call per row over exactly its
    # own keys: batching rows into one padded, masked call was ~25% faster at 16 streams, but
    # SDPA's CPU kernel then splits the work by batch shape, and a row's result changed with
    # its batch (seen on SmolLM2 in bf16). A request's tokens must not depend on its company.
    if n_dec:
        qd = q[:n_dec].view(n_dec, 1, KVH, G, hd)
        dt = q.dtype  # a bf16 cache under a float32 model: attended in float32
        outs = [
            F.scaled_dot_product_attention(qd[i], ks[li].to(dt), vs[li].to(dt))
            for i, (_, _, ks, vs) in enumerate(dec_views)
        ]
        attn[:n_dec] = torch.cat(outs).view(n_dec, H, hd)
    off = n_dec
    for s in segments[n_dec:]:
        end = s.start + s.length
        kc, vc = s.store(li, k[off : off + s.length], v[off : off + s.length])  # (KVH, cap, hd)
        qs = q[off : off + s.length].transpose(0, 1).unsqueeze(0)  # (1, H, n, hd)
        # Expanding kv heads to the query heads costs a small copy and beats SDPA's GQA path
        # (measured ~1.6x in bfloat16 on CPU for a 512-token prompt).
        ks = kc[:, :end].to(q.dtype).repeat_interleave(G, dim=0).unsqueeze(0)  # (1, H, end, hd)
        vs = vc[:, :end].to(q.dtype).repeat_interleave(G, dim=0).unsqueeze(0)
        if s.mask is not None:  # a packed token tree: each token sees its ancestors only
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=s.mask.to(q.device, non_blocking=True))
        elif s.start == 0:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
        else:  # a later prefill chunk: causal, offset by the cached prefix
            mask = torch.ones(s.length, end, dtype=torch.bool, device=q.device).tril(diagonal=s.start)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask)
        attn[off : off + s.length] = o[0].transpose(0, 1)
        off += s.length
    return attn
