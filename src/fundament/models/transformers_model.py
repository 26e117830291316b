"""The transformers fallback: any decoder-only causal LM that transformers loads from a local
directory, run by transformers' own forward under fundament's engine, so the engine's continuous
batching, streaming, sampling, grammars, scoring trees and adapters work on it unchanged.

It has the native model's interface (`forward` over a flat batch of segments, `new_cache`,
`add_adapter`). Each segment (a sequence's prompt chunk, decode step or token tree) runs as its own
forward pass over that sequence's transformers cache: slower than the native engine's one batched
pass per step, but exact (the model's own code computes it) and batch-invariant by construction,
as a row never shares a matmul with another sequence. LoRA adapters are PEFT's, loaded into the
model under one name per engine slot and chosen per segment.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from .llama.cache import Segment

log = logging.getLogger(__name__)


@dataclass
class FallbackConfig:
    """What the engine reads of a model's configuration."""

    architecture: str
    max_position_embeddings: int


class TransformersCache:
    """One sequence's transformers cache (a DynamicCache, grown by the model as it runs), never
    past `limit` tokens: the engine's reservation."""

    def __init__(self, limit: int):
        from transformers import DynamicCache

        self.limit = limit
        self.past = DynamicCache()
        self.length = 0  # tokens in `past`

    def reserve(self, n_tokens: int) -> None:
        assert n_tokens <= self.limit, "a sequence outgrew its reservation"


class TransformersModel:
    kind = "transformers"
    native = False  # no native kernel: /health says so
    rows_alone = False  # keys and values come from transformers' kernels: no prefix reuse

    def __init__(self, model, dtype: torch.dtype, device: torch.device):
        self.model = model.eval()
        self.dtype, self.device = dtype, device
        cfg = model.config
        arch = (getattr(cfg, "architectures", None) or [type(model).__name__])[0]
        context = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048
        self.cfg = FallbackConfig(arch, int(context))
        # Where the model's forward takes `logits_to_keep`, only the rows the engine reads are
        # projected onto the vocabulary (a prompt's other rows skip the head).
        params = inspect.signature(model.forward).parameters
        self._keep = "logits_to_keep" in params
        # transformers 5.x names the cache argument `cache` (`past_key_values` before, deprecated).
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.peft: Any = None  # the PEFT wrapper (PeftModel), once an adapter is loaded
        self.reason = ""  # why the native engine does not serve it (set by the registry; /health shows it)

    @classmethod
    def from_dir(cls, path: str | Path, dtype=torch.float32, device="cpu") -> TransformersModel:
        from transformers import AutoModelForCausalLM

        device = torch.device(device)
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa")
        except ValueError:  # an architecture without SDPA support: its own eager attention
            try:
                model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="eager")
            except Exception as e:
                raise ConfigError(f"transformers cannot load {path} as a causal LM: {e}", "path") from e
        except Exception as e:
            raise ConfigError(f"transformers cannot load {path} as a causal LM: {e}", "path") from e
        if getattr(model.config, "is_encoder_decoder", False):
            raise ConfigError(f"{path} is an encoder-decoder model; fundament serves decoder-only models", "path")
        model.to(device)
        return cls(model, dtype, device)

    # ---- adapters ---------------------------------------------------------------------------

    def add_adapter(self, slot: int, path: str | Path) -> None:
        """Load a PEFT LoRA directory as adapter `slot` (replacing what was there)."""
        from peft import PeftModel

        name = f"slot{slot}"
        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.model, str(path), adapter_name=name)
            self.peft.eval()
            return
        if name in self.peft.peft_config:
            self.remove_adapter(slot)
        self.peft.load_adapter(str(path), adapter_name=name)
        self.peft.eval()

    def remove_adapter(self, slot: int) -> None:
        name = f"slot{slot}"
        if self.peft is None or name not in self.peft.peft_config:
            return
        others = [n for n in self.peft.peft_config if n != name]
        if others:
            self.peft.set_adapter(others[0])  # PEFT will not delete the active adapter
            self.peft.delete_adapter(name)
        else:  # the last one: back to the plain model
            self.model = self.peft.unload()
            self.peft = None

    def _runner(self, adapter: int | None):
        """The module to run a segment with, and the context it runs in."""
        import contextlib

        if self.peft is None:
            return self.model, contextlib.nullcontext()
        if adapter is None or f"slot{adapter}" not in self.peft.peft_config:
            return self.peft, self.peft.disable_adapter()
        self.peft.set_adapter(f"slot{adapter}")
        return self.peft, contextlib.nullcontext()

    # ---- the engine's interface -------------------------------------------------------------

    def new_cache(self, max_tokens: int) -> TransformersCache:
        return TransformersCache(max_tokens)

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, segments: list[Segment], logit_rows: torch.Tensor, n_sampled: int | None = None
    ) -> torch.Tensor:
        """As the native model's: logits (R, V) on the CPU for the flat-batch rows `logit_rows`."""
        rows = logit_rows.tolist()
        out: list[torch.Tensor] = []
        off, at = 0, 0
        for s in segments:
            end = off + s.length
            local = []
            while at < len(rows) and rows[at] < end:
                local.append(rows[at] - off)
                at += 1
            logits = self._segment(input_ids[off:end], s, local)
            if logits is not None:
                out.append(logits)
            off = end
        if not out:
            return torch.empty(0, 0)
        return torch.cat(out).float().cpu()

    def _segment(self, ids: torch.Tensor, s: Segment, local: list[int]) -> torch.Tensor | None:
        cache = s.cache
        assert isinstance(cache, TransformersCache)
        if cache.length != s.start:  # the engine re-runs from an earlier slot: drop what follows
            cache.past.crop(s.start)
            cache.length = s.start
        positions = s.positions if s.positions is not None else torch.arange(s.start, s.start + s.length)
        kwargs: dict = {}
        if s.mask is not None:  # a token tree: which cache slots each token sees, as an additive mask
            blocked = torch.finfo(self.dtype).min
            mask = torch.zeros(s.mask.shape, dtype=self.dtype).masked_fill(~s.mask, blocked)
            kwargs["attention_mask"] = mask[None, None].to(self.device)
        if self._keep:
            kwargs["logits_to_keep"] = torch.tensor(local, dtype=torch.long, device=self.device)
        module, context = self._runner(s.adapter)
        with context:
            result = module(
                input_ids=ids[None].to(self.device),
                position_ids=positions[None].to(self.device),
                use_cache=True,
                **{self._cache_arg: cache.past},
                **kwargs,
            )
        cache.length = s.start + s.length
        if not local:
            return None
        logits = result.logits[0]
        return logits if self._keep else logits[local]
