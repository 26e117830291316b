"""Which examples a run sees: seeded, nested training subsets (one example of every class first,
so even 8 examples hold each of 6 classes) and an optional seeded sample of the test split.
Knows examples and labels only.
"""

from __future__ import annotations

import hashlib
import json
import random

from .tasks import Example, Task

TEST_SAMPLE_SEED = 0  # --limit draws the same test examples whatever the run's seeds


def subset_order(train: list[Example], classes: list[str], seed: int) -> list[int]:
    """A seeded order of the train split: the first example of each class (in that shuffle), then
    the rest of the shuffle. The first n of it are the n-example subset, so the subsets of one seed
    are nested (8 within 32 within 128 ...) and a learning curve moves one thing at a time."""
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    first: dict[str, int] = {}
    for i in order:
        first.setdefault(train[i].label, i)
    leaders = [first[c] for c in classes if c in first]
    taken = set(leaders)
    return leaders + [i for i in order if i not in taken]


def train_subset(task: Task, n: int, seed: int) -> list[Example]:
    return [task.train[i] for i in subset_order(task.train, task.classes, seed)[:n]]


def held_out(task: Task, limit: int | None) -> list[Example]:
    """The whole test split, or a seeded sample of `limit` of it (in the split's own order)."""
    if limit is None or limit >= len(task.test):
        return list(task.test)
    keep = sorted(random.Random(TEST_SAMPLE_SEED).sample(range(len(task.test)), limit))
    return [task.test[i] for i in keep]


def fingerprint(*parts) -> str:
    """A short hash of JSON-able parts (examples are hashed by text and label)."""

    def plain(x):
        if isinstance(x, Example):
            return [x.text, x.label]
        if isinstance(x, (list, tuple)):
            return [plain(y) for y in x]
        if isinstance(x, dict):
            return {str(k): plain(v) for k, v in x.items()}
        return x

    return hashlib.sha256(json.dumps(plain(list(parts)), sort_keys=True).encode()).hexdigest()[:12]
