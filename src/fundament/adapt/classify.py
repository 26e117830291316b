"""Classification by prompting: a probability for every label, from the model's likelihood of
each full label (multi-token labels included), normalised over the label set.

The prompt is a chat: an instruction naming the labels, optional labelled examples as earlier
turns (the k nearest to each input in an embedding space, Liu et al. 2022, "What Makes Good
In-Context Examples for GPT-3?", or k at random), then the input; each label is scored as the
assistant's whole answer, end-of-turn token included, so a label that is a prefix of another is
not favoured. Optional calibration divides by the probabilities the same prompt gives a
content-free input (Zhao et al. 2021, "Calibrate Before Use").
Knows the generation model (tokenizer + engine) and an embedder; knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import math
import random
from dataclasses import dataclass, field

import numpy as np

from ..engine import SamplingParams
from ..errors import ContextLengthExceededError, InvalidRequestError

CONTENT_FREE = "N/A"


@dataclass
class Label:
    name: str
    description: str = ""


@dataclass
class ClassificationResult:
    label: str
    probabilities: dict[str, float]
    examples: list[int] = field(default_factory=list)  # indices of the examples shown
    prompt_tokens: int = 0


def _labels(labels) -> list[Label]:
    if not labels:
        raise InvalidRequestError("labels must list at least two labels.", "labels")
    out = [Label(l) if isinstance(l, str) else Label(l["name"] if isinstance(l, dict) else l.name, (l.get("description") if isinstance(l, dict) else l.description) or "") for l in labels]
    if len(out) < 2:
        raise InvalidRequestError("labels must list at least two labels.", "labels")
    names = [l.name for l in out]
    for i, n in enumerate(names):
        if not n.strip():
            raise InvalidRequestError(f"labels[{i}] is empty.", "labels")
        if names.index(n) != i:
            raise InvalidRequestError(f"labels[{i}] '{n}' is a duplicate; every label must be distinct.", "labels")
    return out


class Classifier:
    MAX_IN_FLIGHT = 32  # scorings submitted at once: enough to fill a batch, never the whole queue

    def __init__(self, lm, embedder=None, adapter: str | None = None):
        """lm: a GenerationModel (tokenizer + engine); embedder: an Embedder for nearest-example
        selection; adapter: a LoRA adapter loaded in lm's engine (an ft: model), or the base model."""
        self.lm, self.embedder, self.adapter = lm, embedder, adapter
        self._slots: asyncio.Semaphore | None = None

    def _instruction(self, labels: list[Label], instruction: str | None) -> str:
        lines = [instruction or "Classify the input."]
        lines.append("Answer with exactly one of these labels and nothing else:")
        lines += [f"- {l.name}" + (f": {l.description}" if l.description else "") for l in labels]
        return "\n".join(lines)

    def _messages(self, system: str, shots: list[tuple[str, str]], text: str, answer_prefix: str) -> list[dict]:
        msgs = [{"role": "system", "content": system}]
        for x, y in shots:  # examples answer exactly as the scored answer is phrased
            msgs += [{"role": "user", "content": x}, {"role": "assistant", "content": f"{answer_prefix} {y}" if answer_prefix else y}]
        return msgs + [{"role": "user", "content": text}]

    def select_examples(self, inputs: list[str], examples: list[tuple[str, str]], k: int, selection: str, seed: int) -> list[list[int]]:
        """For each input, the indices of the k examples to show, most similar last (nearest to
        the question, as Liu et al. order them)."""
        if k == 0 or not examples:
            return [[] for _ in inputs]
        if selection == "random":
            rng = random.Random(seed)
            return [rng.sample(range(len(examples)), k) for _ in inputs]
        if self.embedder is None:
            raise InvalidRequestError("selection 'nearest' needs an embedding model; none is served.", "selection")
        vecs, _ = self.embedder.embed_texts([x for x, _ in examples] + list(inputs))
        v = np.asarray(vecs, dtype=np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True) + 1e-12
        pool, queries = v[: len(examples)], v[len(examples) :]
        sims = queries @ pool.T  # (inputs, pool)
        return [list(np.argsort(row)[-k:]) for row in sims]  # ascending: the nearest comes last

    async def _label_logprob(self, prompt_ids: list[int], label_ids: list[int]) -> float:
        """log P(label tokens | prompt), teacher-forced through the engine's prompt logprobs."""
        params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=True)
        async with self._slots:
            async for out in self.lm.engine.generate(prompt_ids + label_ids, params, adapter=self.adapter):
                lps = out.prompt_logprobs
                return float(sum(lps[len(prompt_ids) : len(prompt_ids) + len(label_ids)]))
        raise RuntimeError("the engine returned no output")

    async def _probabilities(self, messages: list[dict], labels: list[Label], param: str, answer_prefix: str) -> tuple[np.ndarray, int]:
        tok = self.lm.tokenizer
        # The assistant's answer starts with `answer_prefix` (e.g. "The review is"), then the label:
        # the closer this is to how the model answers on its own, the better its likelihoods rank.
        prompt_ids = tok.apply_chat_template(messages) + (tok.encode(answer_prefix) if answer_prefix else [])
        end = tok.eos_token_ids[:1]
        label_ids = [tok.encode((" " if answer_prefix else "") + l.name) + end for l in labels]
        longest = max(len(x) for x in label_ids)
        if len(prompt_ids) + longest + 1 > self.lm.engine.max_context:
            raise ContextLengthExceededError(
                f"The prompt ({len(prompt_ids)} tokens) plus the longest label ({longest}) exceeds the context window of {self.lm.engine.max_context}. Use fewer or shorter examples.",
                param,
            )
        lls = await asyncio.gather(*(self._label_logprob(prompt_ids, ids) for ids in label_ids))
        lls = np.asarray(lls, dtype=np.float64)
        p = np.exp(lls - lls.max())
        return p / p.sum(), len(prompt_ids) * len(labels)

    async def classify(
        self,
        inputs: list[str],
        labels,
        instruction: str | None = None,
        examples: list[dict] | None = None,
        k: int | None = None,
        selection: str = "nearest",
        calibrate: bool = False,
        seed: int = 0,
        answer_prefix: str = "Answer:",
    ) -> list[ClassificationResult]:
        self._slots = asyncio.Semaphore(self.MAX_IN_FLIGHT)
        labels = _labels(labels)
        names = [l.name for l in labels]
        if not inputs:
            raise InvalidRequestError("input must not be empty.", "input")
        pool = []
        for i, ex in enumerate(examples or []):
            if ex.get("label") not in names:
                raise InvalidRequestError(f"examples[{i}] has label {ex.get('label')!r}, which is not one of the labels.", "examples")
            pool.append((str(ex.get("input", "")), ex["label"]))
        k = len(pool) if k is None else k
        if k < 0 or k > len(pool):
            raise InvalidRequestError(f"k is {k} but the example pool has {len(pool)} examples.", "k")
        if selection not in ("nearest", "random"):
            raise InvalidRequestError("selection must be 'nearest' or 'random'.", "selection")
        limit = self.lm.engine.max_context
        tok = self.lm.tokenizer
        for i, l in enumerate(labels):
            if len(tok.encode(l.name)) + 1 >= limit:
                raise ContextLengthExceededError(f"labels[{i}] is longer than the context window ({limit} tokens).", "labels")
        for i, (x, _) in enumerate(pool):
            if len(tok.encode(x)) >= limit:
                raise ContextLengthExceededError(f"examples[{i}] is longer than the context window ({limit} tokens).", "examples")
        system = self._instruction(labels, instruction)
        chosen = self.select_examples(inputs, pool, k, selection, seed)

        async def one(i: int, text: str) -> ClassificationResult:
            shots = [pool[j] for j in chosen[i]]
            p, used = await self._probabilities(self._messages(system, shots, text, answer_prefix), labels, "input", answer_prefix)
            if calibrate:  # Zhao et al. 2021: divide by the content-free input's probabilities
                p_cf, used_cf = await self._probabilities(self._messages(system, shots, CONTENT_FREE, answer_prefix), labels, "input", answer_prefix)
                p = p / np.maximum(p_cf, 1e-12)
                p, used = p / p.sum(), used + used_cf
            probs = {n: float(v) for n, v in zip(names, p)}
            return ClassificationResult(names[int(np.argmax(p))], probs, [int(j) for j in chosen[i]], used)

        return list(await asyncio.gather(*(one(i, t) for i, t in enumerate(inputs))))
