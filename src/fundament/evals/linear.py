"""The logistic-regression head shared by the linear probes and the TF-IDF model (scikit-learn):
fit, predict a probability for every class of the task, and the size of the fitted model on disk.
Knows arrays and label names; nothing of where the features come from.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

MAX_ITER = 2000


def logistic_regression(seed: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=1.0, max_iter=MAX_ITER, random_state=seed)


def fit(model, X, y: list[str]):
    """Fit `model` (an estimator or pipeline ending in a classifier); a training set of one class
    gets a classifier that always answers it (logistic regression needs two)."""
    if len(set(y)) < 2:
        from sklearn.dummy import DummyClassifier

        return DummyClassifier(strategy="most_frequent").fit(np.zeros((len(y), 1)), y)
    return model.fit(X, y)


def predict(model, X, classes: list[str]) -> tuple[list[str], list[dict[str, float]]]:
    """The most probable class and a probability for every class of the task (0 for a class the
    training subset did not hold)."""
    from sklearn.dummy import DummyClassifier

    if isinstance(model, DummyClassifier):
        X = np.zeros((X.shape[0] if hasattr(X, "shape") else len(X), 1))
    p = model.predict_proba(X)  # (N, classes seen in training)
    seen = [str(c) for c in model.classes_]
    probs = [{c: float(row[seen.index(c)]) if c in seen else 0.0 for c in classes} for row in p]
    return [max(d, key=d.__getitem__) for d in probs], probs


def save(model, path: Path) -> int:
    """Pickle the fitted model; its size in bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(model))
    return path.stat().st_size
