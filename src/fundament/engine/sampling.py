"""Sampling parameters and the sampler: per-row logits processing, then greedy or nucleus sampling.

Logits processors are plain callables `(output_ids, logits (V,)) -> logits`, applied per row, so
penalties, `logit_bias` and grammar masks (engine/constraints.py) share one hook.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # 0 = off; else keep tokens of at least min_p x the most likely one's probability
    repetition_penalty: float = 1.0  # 1 = off; CTRL's penalty on every prompt and output token
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k: the chosen token's logprob and the top k
    prompt_logprobs: bool = False
    logits_processors: list[LogitsProcessor] = field(default_factory=list)
    priority: int = 0  # lower first (vLLM's meaning): waiting requests start in (priority, arrival) order

    @property
    def greedy(self) -> bool:
        """The token is the argmax of the processed logits."""
        return self.temperature <= 0 or self.top_k == 1

    def processors(self, prompt_ids: Sequence[int] = ()) -> list[LogitsProcessor]:
        procs = list(self.logits_processors)
        if self.presence_penalty or self.frequency_penalty:
            procs.insert(0, _penalties(self.presence_penalty, self.frequency_penalty))
        if self.repetition_penalty != 1.0:
            procs.insert(0, _repetition(self.repetition_penalty, prompt_ids))
        if self.logit_bias:
            procs.insert(0, _bias(self.logit_bias))
        return procs


def _bias(bias: dict[int, float]) -> LogitsProcessor:
    ids = torch.tensor(list(bias.keys()), dtype=torch.long)
    vals = torch.tensor(list(bias.values()), dtype=torch.float32)

    def apply(output_ids, logits):
        logits[ids] += vals
        return logits

    return apply


def _penalties(presence: float, frequency: float) -> LogitsProcessor:
    # OpenAI's definition: logit -= count * frequency + (count > 0) * presence, over generated tokens.
    def apply(output_ids, logits):
        if output_ids:
            ids, counts = torch.tensor(output_ids).unique(return_counts=True)
            logits[ids] -= counts.float() * frequency + presence
        return logits

    return apply


def _repetition(penalty: float, prompt_ids) -> LogitsProcessor:
    """CTRL's repetition penalty (Keskar et al. 2019, as vLLM and transformers apply it): each token
    already in the prompt or the output has its logit divided by `penalty` if positive, multiplied
    if negative, so a penalty above 1 always makes it less likely."""
    seen = torch.tensor(sorted(set(prompt_ids)), dtype=torch.long)

    def apply(output_ids, logits):
        ids = torch.cat([seen, torch.tensor(output_ids, dtype=torch.long)]).unique() if output_ids else seen
        if len(ids):
            x = logits[ids]
            logits[ids] = torch.where(x > 0, x / penalty, x * penalty)
        return logits

    return apply


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from one row of processed logits (V,)."""
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.min_p > 0:  # after temperature, as vLLM: relative to the most likely token
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    if params.top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_p, dim=-1)
        drop = cum - sorted_p > params.top_p  # keep the smallest set whose mass reaches top_p
        sorted_p[drop] = 0.0
        token = idx[torch.multinomial(sorted_p, 1, generator=generator)]
        return int(token)
    return int(torch.multinomial(probs, 1, generator=generator))
