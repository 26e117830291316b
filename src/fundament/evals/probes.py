"""Linear probes: logistic regression on frozen features, either the embedding model's vectors
(fundament's `/v1/embeddings`) or the chat model's last hidden state, mean-pooled over the text's
tokens (its Hugging Face directory loaded here with transformers). Features are computed once per
text and kept in a SQLite file with the seconds they took, so every subset size reuses them and
still reports what extracting its own texts cost.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import linear
from .measure import Outcome, PeakMemory, time_each
from .splits import fingerprint
from .tasks import Example, Task

if TYPE_CHECKING:
    from transformers import PreTrainedModel

HIDDEN_MAX_TOKENS = 256  # longer texts are cut: SMS messages and reviews fit
BATCH = 32


class FeatureCache:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path)
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS features (extractor TEXT, key TEXT, vec BLOB, seconds REAL, PRIMARY KEY (extractor, key))"
        )

    def features(self, extractor, texts: list[str], progress=None) -> tuple[np.ndarray, float]:
        """(N, D) float32 features of the texts and the seconds extracting them took (when first done)."""
        keys = [fingerprint(t) for t in texts]
        have = {}
        for i in range(0, len(keys), 500):
            part = keys[i : i + 500]
            q = f"SELECT key, vec, seconds FROM features WHERE extractor = ? AND key IN ({','.join('?' * len(part))})"
            have.update({k: (v, s) for k, v, s in self.db.execute(q, (extractor.key, *part))})
        missing = sorted(
            {k: t for k, t in zip(keys, texts) if k not in have}.items(), key=lambda kt: len(kt[1])
        )  # like lengths pad least
        for i in range(0, len(missing), BATCH):
            batch = missing[i : i + BATCH]
            t0 = time.perf_counter()
            vecs = extractor.compute([t for _, t in batch])
            each = (time.perf_counter() - t0) / len(batch)
            rows = [
                (extractor.key, k, np.asarray(v, dtype=np.float32).tobytes(), each) for (k, _), v in zip(batch, vecs)
            ]
            self.db.executemany("INSERT OR REPLACE INTO features VALUES (?, ?, ?, ?)", rows)
            self.db.commit()
            have.update({r[1]: (r[2], r[3]) for r in rows})
            if progress:
                progress(min(i + BATCH, len(missing)), len(missing))
        X = np.stack([np.frombuffer(have[k][0], dtype=np.float32) for k in keys])
        return X, float(sum(have[k][1] for k in keys))


class EmbeddingFeatures:
    """Vectors from a fundament server's /v1/embeddings."""

    def __init__(self, client, model: str):
        self.client, self.model, self.key = client, model, f"embedding:{model}"

    def compute(self, texts: list[str]) -> list[list[float]]:
        import openai

        try:
            r = self.client.embeddings.create(model=self.model, input=texts)
            return [d.embedding for d in sorted(r.data, key=lambda d: d.index)]
        except openai.BadRequestError:
            if len(texts) > 1:  # find the one too long for the model, and shorten only that one
                return [v for t in texts for v in self.compute([t])]
            words = texts[0].split()
            if len(words) < 2:
                raise
            return self.compute([" ".join(words[: len(words) * 3 // 4])])


class HiddenStateFeatures:
    """The chat model's last hidden state, mean-pooled over the text's tokens (no chat template)."""

    def __init__(self, model_name: str):
        from ..config import ServeConfig
        from ..errors import InvalidRequestError
        from ..models.loading import hf_dir_for

        spec = next((m for m in ServeConfig().models if m.name == model_name and m.task == "generate"), None)
        if spec is None:
            raise InvalidRequestError(
                f"probe-hidden needs a configured generation model; '{model_name}' is not one.", "model"
            )
        self.path = hf_dir_for(spec)
        self.key = f"hidden-mean:{model_name}:{fingerprint(str(self.path))}"
        self._model: PreTrainedModel | None = None

    def _load(self) -> PreTrainedModel:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(self.path)
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self._model = AutoModel.from_pretrained(self.path, dtype=torch.float32).eval()
        return self._model

    def compute(self, texts: list[str]) -> list[np.ndarray]:
        import torch

        model = self._model if self._model is not None else self._load()
        enc = self.tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=HIDDEN_MAX_TOKENS)
        with torch.inference_mode():
            h = model(**enc).last_hidden_state  # (B, T, C)
        mask = enc["attention_mask"].unsqueeze(-1).to(h.dtype)  # (B, T, 1)
        pooled = (h * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, C)
        return list(pooled.numpy())


class Probe:
    """Logistic regression (standardised features) on frozen features of the training subset."""

    min_size, max_size, at_zero = 1, None, None

    def __init__(self, name: str, source: str):
        self.name, self.source = name, source
        self.uses_server = source == "embedding"
        self._extractor = None

    def settings(self, cfg) -> dict:
        model = cfg.embedding_model if self.source == "embedding" else cfg.model
        return {
            "features": self.source,
            "model": model,
            "pooling": "mean" if self.source == "hidden" else "model's own",
            "C": 1.0,
        }

    def extractor(self, ctx):
        if self._extractor is None:
            cfg = ctx.config
            if self.source == "embedding":
                self._extractor = EmbeddingFeatures(ctx.fundament.client, cfg.embedding_model)
            else:
                self._extractor = HiddenStateFeatures(cfg.model)
        return self._extractor

    def run(self, ctx, task: Task, train: list[Example], test: list[Example], seed: int) -> Outcome:
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        ex, cache = self.extractor(ctx), ctx.features
        X_train, extract_train_s = cache.features(ex, [e.text for e in train])
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            model = linear.fit(
                make_pipeline(StandardScaler(), linear.logistic_regression(seed)), X_train, [e.label for e in train]
            )
            fit_s = time.perf_counter() - t0
        X_test, extract_test_s = cache.features(ex, [e.text for e in test], ctx.progress)
        t0 = time.perf_counter()
        labels, probs = linear.predict(model, X_test, task.classes)
        predict_s = extract_test_s + time.perf_counter() - t0
        # one example at a time, features computed afresh (not from the cache)
        one = lambda e: linear.predict(model, np.asarray(ex.compute([e.text]), dtype=np.float32), task.classes)  # noqa: E731
        latencies = time_each(one, test[: ctx.config.latency_sample])
        size = linear.save(model, ctx.artifact(task, self.name, len(train), seed, ".pkl"))
        info = {"features": ex.key, "dimensions": int(X_train.shape[1]), "extract_s": extract_train_s, "fit_s": fit_s}
        return Outcome(labels, probs, latencies, predict_s, extract_train_s + fit_s, mem.mb, size, info)
