"""What the engine takes and gives for one sequence: the request with its scheduler state, its
outputs, and the context check that fundament's engine and the vLLM one share."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ContextLengthExceededError
from .sampling import SamplingParams
from .tree import TokenTree

_ids = itertools.count()
LOGPROB_FLOOR = -9999.0  # what OpenAI reports for a token of (near) zero probability


@dataclass
class EngineOutput:
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # "stop" | "length" once the sequence is done
    prompt_logprobs: list[float | None] | None = None  # only on a request's first output


@dataclass
class ScoreOutput:
    """A scoring request's one output: per continuation, log P(token | prompt, earlier tokens)."""

    logprobs: list[list[float]]


@dataclass
class EngineRequest:
    prompt_ids: list[int]
    params: SamplingParams
    on_output: Callable[[EngineOutput | ScoreOutput | BaseException], object]  # its return value is ignored
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    adapter: str | None = None  # a LoRA adapter loaded with Engine.load_adapter, or the base model
    # Set: a scoring request. It prefills this tree (prompt + continuations), sends one
    # ScoreOutput and generates nothing.
    tree: TokenTree | None = None
    # Scheduler state
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose keys/values are in the cache
    cache: Any = None  # its model's cache (KVCache, or TransformersCache on the fallback) while it runs
    generator: torch.Generator | None = None
    processors: list = field(default_factory=list)
    prompt_logprobs: list[float | None] = field(default_factory=list)
    finished: bool = False
    reserved_tokens: int = 0  # KV cache tokens held for it while it runs
    prefix_key: str | None = None  # its prompts' key in the prefix cache (None: not cached)

    @property
    def prefill_ids(self) -> list[int]:
        """What is prefilled: the prompt, or a scoring request's whole packed tree."""
        return self.tree.ids if self.tree is not None else self.prompt_ids

    @property
    def decoding(self) -> bool:
        """Its prompt is prefilled: each step now feeds back the token it generated last."""
        return self.tree is None and self.num_computed >= len(self.prompt_ids)

    @property
    def reports_logits(self) -> bool:
        """Its logits this step are reported or scored (a token tree, prompt_logprobs while
        prefilling), not only sampled from."""
        return self.tree is not None or bool(self.params.prompt_logprobs and self.num_computed < len(self.prompt_ids))

    def record_prompt_logprobs(self, logits: torch.Tensor, n: int) -> None:
        """logits (n, V) of the prompt rows just computed: row j predicts prompt token
        num_computed + j + 1."""
        if self.num_computed == 0:
            self.prompt_logprobs.append(None)  # the first token has no context
        lp = torch.log_softmax(logits, dim=-1)
        for j in range(n):
            nxt = self.num_computed + j + 1
            if nxt < len(self.prompt_ids):
                self.prompt_logprobs.append(float(lp[j, self.prompt_ids[nxt]]))

    @property
    def kv_tokens(self) -> int:
        """KV cache slots it can ever use: its reservation."""
        return len(self.tree) if self.tree is not None else len(self.prompt_ids) + self.params.max_tokens


def check_context(max_context: int, n_prompt: int, max_tokens: int) -> int:
    """The request's total tokens, or ContextLengthExceededError if they exceed the context
    (shared by fundament's engine and the vLLM one)."""
    total = n_prompt + max_tokens
    if total > max_context:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {max_context} tokens. However, you requested "
            f"{total} tokens ({n_prompt} in the prompt, {max_tokens} for the completion). "
            "Reduce the length of the prompt or of max_completion_tokens."
        )
    return total
