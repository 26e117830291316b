"""The Llama family's configuration, read from a Hugging Face config.json: which architectures the
engine's model takes (Llama incl. Llama 3.x, Mistral, Qwen2, Qwen3 with its per-head q/k norms,
Phi-3/Phi-4 with their fused projections, LongRoPE and partial rotary embeddings, Gemma 2/3 with
their norms, soft-capping and per-layer sliding windows, with the rotary embedding's scalings) and
their shapes. A sliding attention window (Mistral
7B v0.1's, Qwen's when enabled) caps the context at the window, where full attention is the same."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...errors import InvalidRequestError

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Phi3ForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
}
GEMMA = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
# Rotary scalings the engine takes (transformers computes their frequencies: modeling_rope_utils).
# "longrope" (Phi-3, Phi-4) has two sets of factors, short and long: as vLLM and llama.cpp do, the
# engine takes one for all sequences, the long one where the model's context is longer than the
# original (transformers starts a sequence on the short set and recomputes it on the long one once
# it grows past the original context). "dynamic" rescales with each sequence's length: not taken.
ROPE_TYPES = {"default", "linear", "llama3", "yarn", "longrope"}


@dataclass
class LlamaConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool = False  # Qwen3: an RMS norm over each head of q and of k, before the rotary embedding
    fused_projections: bool = False  # Phi-3: stored as qkv_proj and gate_up_proj, the engine's own fusion
    hf: dict = field(default_factory=dict, repr=False)  # config.json as read: the rotary scaling's parameters
    # Gemma 2/3: norms scale by (1 + w) (folded into the weights at load), embeddings are scaled by
    # sqrt(hidden), attention and MLP outputs are normed too (four norms per layer), GELU (tanh).
    gemma: bool = False
    query_scale: float | None = None  # Gemma's query_pre_attn_scalar ** -0.5; None: head_dim ** -0.5
    attn_softcap: float | None = None  # Gemma 2: attention scores capped as tanh(s / cap) * cap
    final_softcap: float | None = None  # Gemma 2: the logits likewise
    windows: tuple[int | None, ...] = ()  # per layer: its sliding window, None for full attention
    layer_types: tuple[str, ...] = ()  # per layer, as transformers names them (rotary tables differ by type: Gemma 3)
    rope_by_layer_type: dict = field(default_factory=dict, repr=False)
    rotary_dim: int = 0  # the leading part of each head the rotary embedding turns: 0 (all of it), or less (Phi-4-mini)

    def __post_init__(self) -> None:
        self.rotary_dim = self.rotary_dim or self.head_dim

    @classmethod
    def from_hf(cls, cfg: dict) -> LlamaConfig:
        arch = (cfg.get("architectures") or ["?"])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise InvalidRequestError(
                f"architecture {arch} is not supported; supported: {sorted(SUPPORTED_ARCHITECTURES)}", "model"
            )
        gemma = {}
        if arch in GEMMA:  # read through transformers' own config class: it normalizes older config.json forms
            from transformers import AutoConfig

            g = AutoConfig.for_model(**cfg)
            types = tuple(g.layer_types)
            nested = all(isinstance(v, dict) for v in (g.rope_parameters or {}).values())
            gemma = dict(
                gemma=True,
                query_scale=g.query_pre_attn_scalar**-0.5,
                attn_softcap=getattr(g, "attn_logit_softcapping", None),
                final_softcap=getattr(g, "final_logit_softcapping", None),
                windows=tuple(g.sliding_window if t == "sliding_attention" else None for t in types),
                layer_types=types,
                rope_by_layer_type=dict(g.rope_parameters) if nested else {},
            )
        ropes = list(gemma["rope_by_layer_type"].values()) if gemma and gemma["rope_by_layer_type"] else []
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        for r in ropes or [rope]:
            rope_type = r.get("rope_type", r.get("type", "default"))
            if rope_type not in ROPE_TYPES:
                raise InvalidRequestError(
                    f"rope type {rope_type} is not supported; supported: {sorted(ROPE_TYPES)}", "model"
                )
        heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        # Phi-4-mini rotates only the first part of each head; the rest passes through
        partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
        context = cfg.get("max_position_embeddings", 2048)
        window = cfg.get("sliding_window")
        if window and cfg.get("use_sliding_window", arch in ("MistralForCausalLM", "Phi3ForCausalLM")):
            context = min(context, window)
        return cls(
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rotary_dim=int(head_dim * partial),
            vocab_size=cfg["vocab_size"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
            max_position_embeddings=context,
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", arch == "Qwen2ForCausalLM"),
            qk_norm=arch in ("Qwen3ForCausalLM", "Gemma3ForCausalLM"),
            fused_projections=arch == "Phi3ForCausalLM",
            hf=cfg,
            **gemma,
        )

    @property
    def long_rope(self) -> bool:
        """LongRoPE with a context longer than the original: its long set of factors."""
        rope = self.hf.get("rope_parameters") or self.hf.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type")) != "longrope":
            return False
        original = rope.get("original_max_position_embeddings") or self.hf["original_max_position_embeddings"]
        return self.max_position_embeddings > original

    def rope_frequencies(self, layer_type: str | None = None) -> tuple[torch.Tensor, float]:
        """The rotary embedding's inverse frequencies (rotary_dim / 2,) and the factor its cos and
        sin are scaled by: the plain ones, or transformers' own computation of the model's
        scaling (Llama 3.x's, linear, YaRN, LongRoPE's set), so they are exactly the reference's.
        `layer_type`: for a model whose rotary embedding differs by layer type (Gemma 3's local and
        global)."""
        by_type = self.rope_by_layer_type.get(layer_type) if layer_type else None
        rope = by_type or self.hf.get("rope_parameters") or self.hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "default":
            theta = rope.get("rope_theta", self.rope_theta) if by_type else self.rope_theta
            exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.float32) / self.rotary_dim
            return 1.0 / (theta**exponents), 1.0
        from transformers import AutoConfig
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        hf = AutoConfig.for_model(**self.hf)
        kw: dict = {"layer_type": layer_type} if by_type else {}
        if self.long_rope:  # transformers' long set: a sequence length past the original context
            kw["seq_len"] = self.max_position_embeddings
        inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](hf, torch.device("cpu"), **kw)
        return inv_freq.float(), float(scale)
