"""The Llama-family decoder in plain PyTorch, built for the engine: a flat batch of tokens from many
sequences (prefill chunks and decode steps mixed), each with its own KV cache; decode rows through
the native kernel where it builds. Knows tensors only: nothing of tokenizers, requests or sampling."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ...errors import InvalidRequestError
from .attention import attention
from .cache import KVCache, Segment
from .config import LlamaConfig
from .gemma import gemma_attention
from .linear import PACK_INT8X, Linear
from .weights import Weights, _LazyWeights

# csrc/decode.cpp's kDense, kInt8, kInt4 (ATen's kernels), kPacked (+ csrc/qgemm.h's kind)
NATIVE_DENSE, NATIVE_INT8, NATIVE_INT4, NATIVE_PACKED = 0, 1, 2, 3


class LlamaModel:
    kind = "native"  # what /health calls this path (the other: models/transformers_model.py)
    LORA_TARGETS = ("qkv", "o", "gate_up", "down")  # the fused projections, in the native kernel's order

    def __init__(
        self,
        cfg: LlamaConfig,
        weights: Weights,
        dtype=torch.float32,
        device="cpu",
        int8_decode: bool = True,
        native_decode: bool = True,
        batch_invariant: bool = True,
        kv_dtype: torch.dtype | None = None,
        int8_activations: bool = False,
    ):
        """`native_decode`: run decode rows through the native kernel (models/native.py) when this
        machine can build it; on a CPU only, in bfloat16 or float32. `batch_invariant`: each
        segment's prompt rows get matmuls of their own (see Linear). `kv_dtype`: the KV cache's
        type, the model's (None) or bfloat16 under a float32 model. `int8_activations`: a float32
        model's packed low-bit weights multiply int8 copies of generated tokens' rows (segments
        marked `generated`; engine.int8_activations), prompts' rows stay float32."""
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device(device)
        self.kv_dtype = kv_dtype or dtype
        if self.kv_dtype not in (dtype, torch.bfloat16) or (self.kv_dtype != dtype and dtype != torch.float32):
            raise ValueError(f"a {dtype} model caches keys and values in its own dtype or (float32) in bfloat16")
        self.batch_invariant = batch_invariant
        self.rows_alone = False  # set by _native_args: every plain row computed alone, whatever its batch
        self.int8_rows = False  # set by _native_args: generated tokens' rows take int8 copies
        # float32 takes only exact low-bit copies (Linear), and only where they are packed
        int8 = int8_decode and dtype in (torch.bfloat16, torch.float32) and self.device.type == "cpu"
        self.native = False
        if native_decode and self.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16):
            from .. import native

            self.native = native.load()
        # Low-bit weights in the native build's own layout, for its one kernel (AVX512-BF16; in
        # float32 AVX2's) for every number of rows; else torch's int4/int8 kernels (bf16 only).
        pack = self.native and bool(
            torch.ops.fundament.qgemm_available()
            if dtype == torch.bfloat16
            else torch.ops.fundament.qgemm_f32_available()
        )

        def w(name):
            return weights.pop(name).to(dtype=dtype, device=self.device).contiguous()

        def norm(name):  # Gemma scales by (1 + w): folded in once, in float32
            t = weights.pop(name)
            return (t.float() + 1.0 if cfg.gemma else t).to(dtype=dtype, device=self.device).contiguous()

        def lin(*names, bias=False):
            source = torch.cat([weights.pop(n + ".weight") for n in names])  # as stored (float32 from a GGUF)
            b = torch.cat([w(n + ".bias") for n in names]) if bias else None
            return Linear(
                source.to(dtype=dtype, device=self.device).contiguous(),
                b,
                int8=int8,
                source=source if int8 else None,
                pack=pack,
                int8x=int8_activations,
            )

        self.embed = w("model.embed_tokens.weight")  # (V, C)
        head = "lm_head.weight" if not cfg.tie_word_embeddings and "lm_head.weight" in weights else None
        self.lm_head = Linear(w(head) if head else self.embed, int8=int8, pack=pack, int8x=int8_activations)
        self.norm = norm("model.norm.weight")
        self.layers = []
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            if (
                cfg.gemma
            ):  # the norm before the MLP is pre_feedforward's; attention's and the MLP's outputs are normed too
                norms = {
                    "in_norm": norm(p + "input_layernorm.weight"),
                    "attn_out_norm": norm(p + "post_attention_layernorm.weight"),
                    "post_norm": norm(p + "pre_feedforward_layernorm.weight"),
                    "mlp_out_norm": norm(p + "post_feedforward_layernorm.weight"),
                }
            else:
                norms = {
                    "in_norm": w(p + "input_layernorm.weight"),
                    "post_norm": w(p + "post_attention_layernorm.weight"),
                }
            self.layers.append(
                {
                    **norms,
                    **(
                        {"q_norm": norm(p + "self_attn.q_norm.weight"), "k_norm": norm(p + "self_attn.k_norm.weight")}
                        if cfg.qk_norm
                        else {}
                    ),
                    # Fused projections: one matmul for q,k,v and one for gate,up (Phi-3 stores them so).
                    "qkv": lin(p + "self_attn.qkv_proj", bias=cfg.attention_bias)
                    if cfg.fused_projections
                    else lin(*(p + f"self_attn.{x}_proj" for x in "qkv"), bias=cfg.attention_bias),
                    "o": lin(p + "self_attn.o_proj"),
                    "gate_up": lin(p + "mlp.gate_up_proj")
                    if cfg.fused_projections
                    else lin(p + "mlp.gate_proj", p + "mlp.up_proj"),
                    "down": lin(p + "mlp.down_proj"),
                }
            )
        self.cos, self.sin = self._rope_tables(None)
        # Per layer, its rotary table: one for all, or (Gemma 3) one per layer type
        self._layer_rope = [0] * cfg.num_hidden_layers
        self._ropes = [(self.cos, self.sin)]
        if cfg.rope_by_layer_type:
            kinds = sorted(set(cfg.layer_types))
            self._ropes = [self._rope_tables(k) for k in kinds]
            self._layer_rope = [kinds.index(t) for t in cfg.layer_types]
        if self.native:
            self._native_args()

    def _rope_tables(self, layer_type: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq, rope_scale = self.cfg.rope_frequencies(layer_type)
        t = torch.arange(self.cfg.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)  # (T, rotary_dim), HF's rotate_half convention
        cos = (emb.cos() * rope_scale).to(dtype=self.dtype, device=self.device)
        sin = (emb.sin() * rope_scale).to(dtype=self.dtype, device=self.device)
        return cos, sin

    def _native_args(self) -> None:
        """The native kernel's view of the layers, in its argument order: 2 norms (Gemma 4; q and
        k norms 2 more) and 4 linears (a kind, then 3 tensors) per layer."""
        none = torch.empty(0, dtype=self.dtype)
        # per layer, in the kernel's order: Gemma's four (outputs normed too), then q and k norms if any
        norms: tuple[str, ...] = ("in_norm", "post_norm")
        if self.cfg.gemma:
            norms = ("in_norm", "attn_out_norm", "post_norm", "mlp_out_norm")
        norms += ("q_norm", "k_norm") if self.cfg.qk_norm else ()
        self._native_norms = [layer[name] for layer in self.layers for name in norms]
        self._native_lin, self._native_kinds, self._native_kinds_int8 = [], [], []
        for layer in self.layers:
            for name in self.LORA_TARGETS:
                lin: Linear = layer[name]
                if lin.packed is not None:
                    kind, a, b = NATIVE_PACKED + lin.packed[0], lin.packed[1], lin.packed[2]
                elif lin.q4 is not None:
                    kind, a, b = NATIVE_INT4, *lin.q4
                elif lin.q8 is not None:
                    assert lin.scale is not None  # Linear sets q8 and its scale together
                    kind, a, b = NATIVE_INT8, lin.q8, lin.scale
                else:
                    kind, a, b = NATIVE_DENSE, lin.weight, none
                self._native_kinds.append(kind)
                self._native_kinds_int8.append(kind + PACK_INT8X if lin.int8x else kind)
                self._native_lin += [a, b, lin.bias if lin.bias is not None else none]
        # Every plain row (prompt chunks too) through the native kernel when its matmuls are the
        # packed ones: those compute each row alone and fast at any number of rows, and the
        # kernel's attention is per row, so a row's result is the same however its prompt was
        # chunked or batched (and prefix caching can reuse keys and values computed elsewhere).
        # Not where a layer's packed weights are int8 (not exact): prompt rows then take its bf16
        # copy on the Python path, as decode rows take the int8 one.
        self.rows_alone = all(
            layer[name].packed is not None and not layer[name].dense_prompts
            for layer in self.layers
            for name in self.LORA_TARGETS
        )
        # Generated tokens' rows in int8 where some weight takes them (engine.int8_activations)
        self.int8_rows = self._native_kinds_int8 != self._native_kinds

    @classmethod
    def from_dir(
        cls,
        path: str | Path,
        dtype=torch.float32,
        device="cpu",
        int8_decode: bool = True,
        native_decode: bool = True,
        batch_invariant: bool = True,
        cfg: LlamaConfig | None = None,
        kv_dtype: torch.dtype | None = None,
        int8_activations: bool = False,
    ) -> LlamaModel:
        """`cfg`: the directory's config where the caller has read it already."""
        path = Path(path)
        cfg = cfg or LlamaConfig.from_hf(json.loads((path / "config.json").read_text()))
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise InvalidRequestError(f"no .safetensors weights in {path}", "model")
        return cls(
            cfg,
            _LazyWeights(files),
            dtype=dtype,
            device=device,
            int8_decode=int8_decode,
            native_decode=native_decode,
            batch_invariant=batch_invariant,
            kv_dtype=kv_dtype,
            int8_activations=int8_activations,
        )

    def add_adapter(self, slot: int, path: str | Path) -> None:
        """Load a PEFT LoRA directory into adapter slot `slot` (replacing what was there)."""
        from ..lora import load_lora

        c = self.cfg
        q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        sizes = {
            "qkv": [q, kv, kv],
            "o": [c.hidden_size],
            "gate_up": [c.intermediate_size] * 2,
            "down": [c.hidden_size],
        }
        layers = load_lora(path, sizes, c.num_hidden_layers, self.dtype, self.device)
        self.remove_adapter(slot)
        for layer, weights in zip(self.layers, layers):
            for name, ab in weights.items():
                layer[name].lora[slot] = ab

    def remove_adapter(self, slot: int) -> None:
        for layer in self.layers:
            for name in self.LORA_TARGETS:
                layer[name].lora.pop(slot, None)

    def new_cache(self, max_tokens: int) -> KVCache:
        return KVCache(self.cfg, self.kv_dtype, self.device, max_tokens)

    def _rms_norm(self, x, weight):
        # HF's order of operations (statistics in float32), so float32 greedy output matches it.
        # (Fewer small ops than F.rms_norm, whose CPU kernel costs ~20us per call here.)
        xf = x.float()
        return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.cfg.rms_norm_eps)).to(x.dtype)

    @staticmethod
    def _rope(x, cos, sin):
        # x: (N, heads, hd); cos/sin: (N, 1, rotary_dim): a partial rotary embedding passes the rest
        if (rot := cos.shape[-1]) < x.shape[-1]:
            return torch.cat([LlamaModel._rope(x[..., :rot], cos, sin), x[..., rot:]], dim=-1)
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def _lora_rows(self, segments: list[Segment]) -> list[tuple[int, torch.Tensor]]:
        """For each adapter in the batch, the flat-batch rows that use it."""
        rows: dict[int, list[int]] = {}
        off = 0
        for s in segments:
            if s.adapter is not None:
                rows.setdefault(s.adapter, []).extend(range(off, off + s.length))
            off += s.length
        return [(slot, torch.tensor(r).to(self.device, non_blocking=True)) for slot, r in rows.items()]

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, segments: list[Segment], logit_rows: torch.Tensor, n_sampled: int | None = None
    ) -> torch.Tensor:
        """input_ids: (N,) the tokens of all segments back to back. Returns logits (R, V) for the
        rows of the flat batch named by logit_rows (usually each segment's last token), on the CPU
        whatever the model's device: sampling, logits processors and grammar masks run there.
        Decode segments (one plain token) must come first, and their logit rows first too; then
        plain prompt chunks, then token trees. `n_sampled`: the first logit rows that are only
        sampled from (the rest are reported or scored); they may take the output head's int8
        copy. None: the decode rows'. Leading segments marked `generated` (generated tokens fed
        back) take int8 rows where the model has them (`int8_rows`), every layer and the head:
        which rows do is a property of each request's own tokens, never of its batch."""
        n_dec = 0
        while n_dec < len(segments) and segments[n_dec].is_decode:
            n_dec += 1
        n_gen = 0
        if self.int8_rows:
            while n_gen < n_dec and segments[n_gen].generated:
                n_gen += 1
        # Rows for the native kernel: the decode rows, or with `rows_alone` every plain segment
        # in front (the engine puts token trees last).
        n_native = n_dec
        if self.rows_alone:
            while n_native < len(segments) and segments[n_native].is_plain:
                n_native += 1
        if self.device.type != "cpu":  # the batch's index tensors are built on the CPU
            input_ids, logit_rows = (t.to(self.device, non_blocking=True) for t in (input_ids, logit_rows))
        for s in segments:
            s.cache.reserve(s.start + s.length)
        if self.native and n_native:
            # Those rows through the native kernel (generated tokens' rows apart where they take
            # int8 rows), the rest (prefill chunks, token trees) here.
            rows = sum(s.length for s in segments[:n_native])
            parts = [self._decode_native(input_ids[:n_gen], segments[:n_gen], int8=True)] if n_gen else []
            if n_native > n_gen:
                parts.append(self._decode_native(input_ids[n_gen:rows], segments[n_gen:n_native]))
            if n_native < len(segments):
                parts.append(self._layers(input_ids[rows:], segments[n_native:], 0))
            x = torch.cat(parts) if len(parts) > 1 else parts[0]
        else:
            x = self._layers(input_ids, segments, n_dec)
        x = self._rms_norm(x[logit_rows], self.norm)
        fast = n_dec if n_sampled is None else n_sampled
        splits = None
        if self.batch_invariant and len(logit_rows) > fast:  # the other rows' logits, per sequence (as in the layers)
            ends = torch.tensor([s.length for s in segments]).cumsum(0)
            per_segment = torch.bucketize(logit_rows[fast:].cpu(), ends, right=True).bincount(minlength=len(segments))
            splits = [n for n in per_segment.tolist() if n]
        n_int8 = int((logit_rows < n_gen).sum()) if n_gen else 0  # the generated rows' (their one each)
        logits = self.lm_head(x, fast, splits=splits, n_int8=n_int8).float()  # (R, V)
        if self.cfg.final_softcap:  # Gemma 2
            logits = torch.tanh(logits / self.cfg.final_softcap) * self.cfg.final_softcap
        return logits.cpu()

    def _decode_native(self, input_ids: torch.Tensor, segments: list[Segment], int8: bool = False) -> torch.Tensor:
        """Every layer for the segments' rows in one native call (each row with its cache and
        position; a segment's rows attend causally, as the kernel writes every row's keys and
        values before any row attends); returns the last hidden states (rows, C). `int8`: the
        rows multiply int8 copies where a weight takes them."""
        positions = [p for s in segments for p in range(s.start, s.start + s.length)]
        lora, counts = [], [0] * len(self._native_kinds)
        groups = self._lora_rows(segments)
        if groups:  # per (layer, projection): rows, A, B of each adapter present
            for k, lin in enumerate(layer[name] for layer in self.layers for name in self.LORA_TARGETS):
                for slot, rows in groups:
                    if slot in lin.lora:
                        lora += [rows, *lin.lora[slot]]
                        counts[k] += 1
        index = torch.tensor(positions)
        cfg = self.cfg
        if len(self._ropes) > 1:  # a table per layer type (Gemma 3): (types, rows, rotary dims)
            cos, sin = (torch.stack([t[i][index] for t in self._ropes]) for i in (0, 1))
        else:
            cos, sin = self.cos[index], self.sin[index]
        return torch.ops.fundament.decode_layers(
            self._embed(input_ids),
            cos,
            sin,
            self._native_norms,
            self._native_lin,
            self._native_kinds_int8 if int8 else self._native_kinds,
            lora,
            counts,
            [s.cache.k for s in segments for _ in range(s.length)],
            [s.cache.v for s in segments for _ in range(s.length)],
            positions,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.rms_norm_eps,
            cfg.gemma,
            cfg.query_scale or 0.0,
            cfg.attn_softcap or 0.0,
            [w or 0 for w in cfg.windows],
            self._layer_rope if len(self._ropes) > 1 else [],
        )

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed[input_ids]
        if self.cfg.gemma:  # scaled by sqrt(hidden), the factor rounded to the model's dtype as Gemma does
            x = x * torch.tensor(self.cfg.hidden_size**0.5, dtype=x.dtype)
        return x

    def _layers(self, input_ids: torch.Tensor, segments: list[Segment], n_dec: int) -> torch.Tensor:
        """Every layer through PyTorch calls; returns the last hidden states (N, C)."""
        cfg = self.cfg
        H, KVH, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        lora_rows = self._lora_rows(segments)
        if all(s.is_decode for s in segments):
            positions = torch.tensor([s.start for s in segments])
        else:
            positions = torch.cat(
                [
                    s.positions if s.positions is not None else torch.arange(s.start, s.start + s.length)
                    for s in segments
                ]
            )
        positions = positions.to(self.device, non_blocking=True)
        # Per decode row, across layers: where this step's key/value go (L, KVH, hd) and the keys
        # and values attended to (L, 1, KVH, len, hd).
        dec_views = [
            (
                c.k[:, :, s.start],
                c.v[:, :, s.start],
                c.k[:, :, : s.start + 1].unsqueeze(1),
                c.v[:, :, : s.start + 1].unsqueeze(1),
            )
            for s in segments[:n_dec]
            for c in (s.cache,)
        ]
        ropes = [(c[positions].unsqueeze(1), s[positions].unsqueeze(1)) for c, s in self._ropes]  # (N, 1, hd)
        N = input_ids.shape[0]
        x = self._embed(input_ids)  # (N, C)
        q_dim, kv_dim = H * hd, KVH * hd
        splits = (
            [s.length for s in segments[n_dec:]] if self.batch_invariant else None
        )  # each prompt's rows: matmuls of their own
        for li, layer in enumerate(self.layers):
            h = self._rms_norm(x, layer["in_norm"])
            qkv = layer["qkv"](h, n_dec, lora_rows, splits)  # (N, q_dim + 2 kv_dim)
            qk = qkv[:, : q_dim + kv_dim].view(N, H + KVH, hd)
            if cfg.qk_norm:  # Qwen3: each head of q and of k RMS-normed first
                qk = torch.cat(
                    [self._rms_norm(qk[:, :H], layer["q_norm"]), self._rms_norm(qk[:, H:], layer["k_norm"])], 1
                )
            qk = self._rope(qk, *ropes[self._layer_rope[li]])  # q and k in one go
            q, k = qk[:, :H], qk[:, H:]
            v = qkv[:, q_dim + kv_dim :].view(N, KVH, hd)
            if cfg.gemma:
                attn = gemma_attention(cfg, li, q, k, v, segments, dec_views)  # (N, H, hd)
            else:
                attn = attention(li, q, k, v, segments, n_dec, dec_views)
            out = layer["o"](attn.view(N, q_dim), n_dec, lora_rows, splits)
            x = x + (self._rms_norm(out, layer["attn_out_norm"]) if cfg.gemma else out)
            h = self._rms_norm(x, layer["post_norm"])
            gate, up = layer["gate_up"](h, n_dec, lora_rows, splits).chunk(2, dim=-1)
            act = F.gelu(gate, approximate="tanh") if cfg.gemma else F.silu(gate)
            out = layer["down"](act * up, n_dec, lora_rows, splits)
            x = x + (self._rms_norm(out, layer["mlp_out_norm"]) if cfg.gemma else out)
        return x
