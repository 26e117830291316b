"""Any OpenAI-compatible chat model (a base URL, a key, a model name) asked the same prompts as the
classification endpoint: the same PromptFormat (system message with the labels, the same examples
in the same format, answers phrased with the same answer prefix). The label is parsed from the
reply; a probability per label comes from the top_logprobs of the reply's first label token where
the server returns logprobs. Talks HTTP through the official `openai` client; nearest examples
are chosen as the endpoint chooses them, over fundament's /v1/embeddings.
"""

from __future__ import annotations

import math
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from ..adapt.classify import Classifier
from ..adapt.prompt import PromptFormat
from .measure import Outcome, time_each
from .server import openai_client
from .tasks import Example, Task

if TYPE_CHECKING:
    from openai import OpenAI
    from openai.types.chat import ChatCompletion

TOP_LOGPROBS = 20  # OpenAI's most
CONCURRENCY = 4  # requests in flight on the batched pass


class EndpointEmbedder:
    """The Embedder interface Classifier.select_examples needs, over a server's /v1/embeddings."""

    def __init__(self, client, model: str):
        self.client, self.model = client, model

    def embed_texts(self, texts: list[str]) -> tuple[list[list[float]], int]:
        out = []
        for i in range(0, len(texts), 256):
            r = self.client.embeddings.create(model=self.model, input=texts[i : i + 256])
            out += [d.embedding for d in sorted(r.data, key=lambda d: d.index)]
        return out, 0


def parse_label(reply: str, classes: list[str], answer_prefix: str) -> tuple[str, int]:
    """The label a reply names and where it starts in the reply: the label right after the answer
    prefix (or at the start), else the earliest one mentioned; ("", -1) when none is."""
    low = reply.lower()
    start = len(reply) - len(reply.lstrip())
    if answer_prefix and low[start:].startswith(answer_prefix.lower()):
        start += len(answer_prefix)
    start += len(reply[start:]) - len(reply[start:].lstrip(" \t\n:*\"'"))
    for c in sorted(classes, key=len, reverse=True):
        if low.startswith(c.lower(), start):
            return c, start
    found = [(m.start(), c) for c in classes for m in [re.search(rf"\b{re.escape(c.lower())}\b", low)] if m]
    return (min(found)[1], min(found)[0]) if found else ("", -1)


def label_probabilities(tokens, at_char: int, classes: list[str]) -> dict[str, float] | None:
    """From the logprobs of the token where the label starts: each alternative token that begins a
    label (its text, stripped and lowercased, a prefix of the label) gives that label its
    probability; the sum is normalised over the labels. None when no alternative begins one."""
    pos, token = 0, None
    for t in tokens:
        if pos + len(t.token) > at_char:
            token = t
            break
        pos += len(t.token)
    if token is None:
        return None
    mass = dict.fromkeys(classes, 0.0)
    for alt in token.top_logprobs or [token]:
        piece = alt.token.strip().lower()
        fits = [c for c in classes if piece and c.lower().startswith(piece)]
        for c in fits:  # a piece that begins several labels shares its probability among them
            mass[c] += math.exp(alt.logprob) / len(fits)
    total = sum(mass.values())
    return {c: v / total for c, v in mass.items()} if total > 0 else None


class Remote:
    """Zero-shot or few-shot prompting of a remote chat model, parsed (and logprobs where given)."""

    uses_server = False
    uses_input_prefix = True  # the same prompt as the local prompting strategies

    def __init__(self, name: str, selection: str | None):
        self.name, self.selection = name, selection
        self.min_size = 0 if selection is None else 1
        self.max_size = 0 if selection is None else None
        self.at_zero = None if selection is None else "remote-zero-shot"
        self.uses_server = selection == "nearest"  # fundament's embeddings pick the nearest examples
        self._client: OpenAI | None = None
        self._logprobs = True

    def settings(self, cfg) -> dict:
        return {
            "base_url": cfg.remote_base_url,
            "model": cfg.remote_model,
            "k": cfg.k if self.selection else 0,
            "selection": self.selection,
            "embedding_model": cfg.embedding_model if self.selection == "nearest" else None,
            "example_format": cfg.example_format if self.selection else None,
        }

    def _chat(self, client: OpenAI, cfg, messages: list[dict]) -> ChatCompletion:
        kw: dict[str, Any] = {"model": cfg.remote_model, "messages": messages, "temperature": 0, "max_tokens": 16}
        if self._logprobs:
            import openai

            try:
                return client.chat.completions.create(**kw, logprobs=True, top_logprobs=TOP_LOGPROBS)
            except openai.BadRequestError:  # a server without logprobs refuses them: parse labels only
                self._logprobs = False
        return client.chat.completions.create(**kw)

    def run(self, ctx, task: Task, train: list[Example], test: list[Example], seed: int) -> Outcome:
        from ..errors import InvalidRequestError

        cfg = ctx.config
        if not (cfg.remote_base_url and cfg.remote_model):
            raise InvalidRequestError(
                "remote strategies need --remote-base-url and --remote-model (and a key: --remote-api-key-env).",
                "remote_base_url",
            )
        client = self._client = self._client or openai_client(cfg.remote_base_url, cfg.remote_api_key, timeout=120)
        fmt = PromptFormat(task.instruction, task.answer_prefix, task.input_prefix, example_format=cfg.example_format)
        d = task.descriptions or {}
        labels = [(c, d.get(c, "")) for c in task.classes]
        pool = [(e.text, e.label) for e in train] if self.selection else []
        k = min(cfg.k, len(pool))
        selector = Classifier(
            None,
            EndpointEmbedder(ctx.fundament.client, cfg.embedding_model)
            if pool and self.selection == "nearest"
            else None,
        )
        chosen = selector.select_examples(
            [e.text for e in test], pool, k, self.selection or "random", seed
        )  # as the endpoint chooses
        messages = [fmt.messages(labels, [pool[j] for j in chosen[i]], e.text) for i, e in enumerate(test)]

        def one(i: int):
            r = self._chat(client, cfg, messages[i])
            reply = r.choices[0].message.content or ""
            label, at = parse_label(reply, task.classes, task.answer_prefix)
            lp = r.choices[0].logprobs
            p = label_probabilities(lp.content, at if at >= 0 else 0, task.classes) if lp and lp.content else None
            return label, p, reply

        t0 = time.perf_counter()
        done = []
        with ThreadPoolExecutor(CONCURRENCY) as pool_:
            try:
                for res in pool_.map(one, range(len(test))):
                    done.append(res)
                    if ctx.progress:
                        ctx.progress(len(done), len(test))
            except BaseException:  # the cell has failed: the requests not yet sent are not sent (a server that is down fails each after retries)
                pool_.shutdown(cancel_futures=True)
                raise
        predict_s = time.perf_counter() - t0
        latencies = time_each(one, list(range(min(cfg.latency_sample, len(test)))))
        with_logprobs = self._logprobs and any(p is not None for _, p, _ in done)
        probs, fallbacks = None, 0
        if with_logprobs:  # an example whose alternatives name no label: all its mass on the parsed label
            probs = []
            for label, p, _ in done:
                if p is None:
                    fallbacks += 1
                    p = {c: (1.0 if c == label else 0.0) if label else 1 / len(task.classes) for c in task.classes}
                probs.append(p)
        info = {
            "base_url": cfg.remote_base_url,
            "model": cfg.remote_model,
            "k": k,
            "selection": self.selection,
            "example_format": cfg.example_format,
            "unparsed": sum(1 for label, _, _ in done if not label),
            "logprobs": with_logprobs,
            "probability_fallbacks": fallbacks,
            "reply_examples": [r for _, _, r in done[:3]],
        }
        return Outcome([label for label, _, _ in done], probs, latencies, predict_s, info=info)
