"""The strategies an evaluation compares, by name, and which (size, seed) cells each one runs.

A strategy has `name`, `uses_server`, `min_size`/`max_size` (the training sizes it runs at),
`at_zero` (the strategy whose 0-example result stands for its own: few-shot and LoRA with no
examples are zero-shot prompting of the base model), `settings(cfg)` (what its results depend
on, for the cache key) and `run(ctx, task, train, test, seed) -> Outcome`.
"""

from __future__ import annotations

from ..errors import InvalidRequestError

DESCRIPTIONS = {
    "zero-shot": "prompting, no examples: a probability per label from the label likelihoods (/v1/classifications)",
    "few-shot-random": "prompting with k examples drawn at random from the training subset",
    "few-shot-nearest": "prompting with the k training examples nearest to the input (embedding similarity)",
    "lora": "LoRA fine-tuning of the chat model through the fine-tuning jobs API, scored like zero-shot",
    "probe-embedding": "logistic regression on the embedding model's vectors (/v1/embeddings)",
    "probe-hidden": "logistic regression on the chat model's last hidden state, mean-pooled over the text's tokens",
    "tfidf": "TF-IDF (word 1-2 grams) and logistic regression, trained from scratch",
    "remote-zero-shot": "a remote OpenAI-compatible chat model, the zero-shot prompt; label parsed, probabilities from logprobs",
    "remote-few-shot-random": "the remote chat model with k random examples",
    "remote-few-shot-nearest": "the remote chat model with the k nearest examples",
}
LOCAL = ["zero-shot", "few-shot-random", "few-shot-nearest", "lora", "probe-embedding", "probe-hidden", "tfidf"]
REMOTE = ["remote-zero-shot", "remote-few-shot-random", "remote-few-shot-nearest"]


def make(name: str):
    from .finetune import LoRA  # the strategies' modules import torch and scikit-learn: only when run
    from .probes import Probe
    from .prompting import Prompting
    from .remote import Remote
    from .tfidf import TfIdf

    factories = {
        "zero-shot": lambda: Prompting("zero-shot", None),
        "few-shot-random": lambda: Prompting("few-shot-random", "random"),
        "few-shot-nearest": lambda: Prompting("few-shot-nearest", "nearest"),
        "lora": LoRA,
        "probe-embedding": lambda: Probe("probe-embedding", "embedding"),
        "probe-hidden": lambda: Probe("probe-hidden", "hidden"),
        "tfidf": TfIdf,
        "remote-zero-shot": lambda: Remote("remote-zero-shot", None),
        "remote-few-shot-random": lambda: Remote("remote-few-shot-random", "random"),
        "remote-few-shot-nearest": lambda: Remote("remote-few-shot-nearest", "nearest"),
    }
    if name not in factories:
        raise InvalidRequestError(f"unknown strategy {name!r}; known: {', '.join(factories)}.", "strategies")
    return factories[name]()


def expand(names: list[str]) -> list[str]:
    """Names as given, with `local` and `remote` standing for their groups, duplicates dropped."""
    out: list[str] = []
    for n in names:
        for m in LOCAL if n == "local" else REMOTE if n == "remote" else [n]:
            if m not in out:
                out.append(m)
    return out


def sizes_for(strategy, sizes: list[int], train_size: int) -> tuple[list[int], list[int]]:
    """(the training sizes it runs at, capped at the train split's size; the sizes it cannot run
    at). Zero-shot runs at 0 only, whatever the sizes; size 0 of a strategy with `at_zero` is
    that strategy's cell, and other strategies need examples to train on."""
    if strategy.max_size == 0:
        return [0], []
    run: list[int] = []
    skipped: list[int] = []
    for n in sorted({min(n, train_size) for n in sizes if n > 0}):
        (run if n >= strategy.min_size else skipped).append(n)
    return run, skipped
