"""Prompting strategies through fundament's `POST /v1/classifications`: zero-shot, and few-shot with
k random or k nearest examples drawn from the training subset. The same request scores a
fine-tuned `ft:` model (finetune.py). Talks to the server through the official `openai` client;
knows nothing of how the server computes the probabilities.
"""

from __future__ import annotations

import time

from .measure import Outcome, time_each
from .tasks import Example, Task

CHUNK = 32  # inputs per request on the batched pass: the server scores them together


def label_objects(task: Task) -> list[dict]:
    d = task.descriptions or {}
    return [{"name": c, **({"description": d[c]} if d.get(c) else {})} for c in task.classes]


def request_body(
    task: Task,
    model: str,
    train: list[Example],
    k: int,
    selection: str | None,
    seed: int,
    example_format: str = "list",
    input_prefix: bool = True,
) -> dict:
    """`input_prefix`: introduce the input as the task does ("Message: ..."); the LoRA strategy
    leaves it out, as its training examples do."""
    body = {
        "model": model,
        "labels": label_objects(task),
        "instruction": task.instruction,
        "answer_prefix": task.answer_prefix,
        "seed": seed,
    }
    if input_prefix and task.input_prefix:
        body["input_prefix"] = task.input_prefix
    if train and selection:
        body.update(
            examples=[{"input": e.text, "label": e.label} for e in train],
            selection=selection,
            example_format=example_format,
        )
        if k < len(train):  # else the whole pool (k left out: the server then orders it by similarity too)
            body["k"] = k
    return body


def classify(client, body: dict, test: list[Example], latency_sample: int, progress=None) -> Outcome:
    """Classify the test split in chunks (throughput), then `latency_sample` of it one request each."""
    labels, probs = [], []
    t0 = time.perf_counter()
    for i in range(0, len(test), CHUNK):
        chunk = test[i : i + CHUNK]
        r = client.post("/classifications", cast_to=object, body={**body, "input": [e.text for e in chunk]})
        for d in sorted(r["data"], key=lambda d: d["index"]):
            labels.append(d["label"])
            probs.append(d["probabilities"])
        if progress:
            progress(len(labels), len(test))
    predict_s = time.perf_counter() - t0
    one = lambda e: client.post("/classifications", cast_to=object, body={**body, "input": e.text})  # noqa: E731
    latencies = time_each(one, test[:latency_sample])
    return Outcome(labels, probs, latencies, predict_s)


class Prompting:
    """Zero-shot (selection None) or few-shot with k examples per input from the training subset."""

    uses_server = True
    uses_input_prefix = True  # the task's input prefix is part of its prompt (and of its cache key)

    def __init__(self, name: str, selection: str | None):
        self.name, self.selection = name, selection
        self.min_size = 0 if selection is None else 1
        self.max_size = 0 if selection is None else None
        self.at_zero = None if selection is None else "zero-shot"  # few-shot with no examples is zero-shot

    def settings(self, cfg) -> dict:
        return {
            "model": cfg.model,
            "k": cfg.k if self.selection else 0,
            "selection": self.selection,
            "embedding_model": cfg.embedding_model if self.selection == "nearest" else None,
            "example_format": cfg.example_format if self.selection else None,
        }

    def run(self, ctx, task: Task, train: list[Example], test: list[Example], seed: int) -> Outcome:
        cfg = ctx.config
        body = request_body(task, cfg.model, train, cfg.k, self.selection, seed, cfg.example_format)
        if self.selection == "nearest":
            body["embedding_model"] = cfg.embedding_model
        out = classify(ctx.fundament.client, body, test, cfg.latency_sample, ctx.progress)
        out.info = {
            "model": cfg.model,
            "k": min(cfg.k, len(train)) if self.selection else 0,
            "selection": self.selection,
            "example_format": cfg.example_format if self.selection else None,
        }
        return out
