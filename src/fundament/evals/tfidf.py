"""The small custom model trained from scratch: TF-IDF of word unigrams and bigrams, then logistic
regression (scikit-learn). No pretrained weights at all: the baseline a foundation model has to beat.
"""

from __future__ import annotations

import time

from . import linear
from .measure import Outcome, PeakMemory, time_each
from .tasks import Example, Task


class TfIdf:
    name = "tfidf"
    uses_server = False
    min_size, max_size, at_zero = 1, None, None

    def settings(self, cfg) -> dict:
        return {"ngram_range": [1, 2], "sublinear_tf": True, "C": 1.0}

    def run(self, ctx, task: Task, train: list[Example], test: list[Example], seed: int) -> Outcome:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.pipeline import make_pipeline

        pipe = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True), linear.logistic_regression(seed))
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            model = linear.fit(pipe, [e.text for e in train], [e.label for e in train])
            train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        labels, probs = linear.predict(model, [e.text for e in test], task.classes)
        predict_s = time.perf_counter() - t0
        latencies = time_each(
            lambda e: linear.predict(model, [e.text], task.classes), test[: ctx.config.latency_sample]
        )
        size = linear.save(model, ctx.artifact(task, self.name, len(train), seed, ".pkl"))
        if ctx.progress:
            ctx.progress(len(test), len(test))
        vocabulary = model.steps[0][1].vocabulary_ if hasattr(model, "steps") else {}
        return Outcome(labels, probs, latencies, predict_s, train_s, mem.mb, size, {"vocabulary": len(vocabulary)})
