"""From cached cell records to numbers: each cell's metrics (metrics.py), their mean and spread over
seeds, and the learning curves (a strategy's 0-example point borrowed from its `at_zero`).
Plain data in, plain data out: what results.json holds and the report prints.
"""

from __future__ import annotations

import numpy as np

from .metrics import accuracy, expected_calibration_error, macro_f1, per_class_f1

NUMBERS = ["accuracy", "macro_f1", "ece", "latency_p50_ms", "latency_p95_ms", "throughput_per_s", "train_s", "peak_memory_mb", "size_mb"]


def cell_metrics(record: dict, classes: list[str]) -> dict:
    out, gold = record["outcome"], record["gold"]
    pred = out["labels"]
    m = {
        "accuracy": accuracy(gold, pred),
        "macro_f1": macro_f1(gold, pred, classes),
        "per_class_f1": per_class_f1(gold, pred, classes),
        "ece": None,
        "latency_p50_ms": float(np.percentile(out["latencies_s"], 50) * 1000) if out["latencies_s"] else None,
        "latency_p95_ms": float(np.percentile(out["latencies_s"], 95) * 1000) if out["latencies_s"] else None,
        "throughput_per_s": len(gold) / out["predict_s"] if out["predict_s"] > 0 else None,
        "train_s": out["train_s"],
        "peak_memory_mb": out["peak_memory_mb"],
        "size_mb": out["size_bytes"] / 1e6 if out["size_bytes"] is not None else None,
        "n_test": len(gold),
    }
    if out["probabilities"] is not None:
        conf = [p[label] if label in p else max(p.values()) for p, label in zip(out["probabilities"], pred)]
        m["ece"] = expected_calibration_error(conf, [g == p for g, p in zip(gold, pred)])
    return m


def _mean_std(values: list) -> tuple[float | None, float | None]:
    v = [x for x in values if x is not None]
    if not v:
        return None, None
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def summarize(cells: list[dict], classes: list[str]) -> dict:
    """One row per (strategy, size): the mean and standard deviation over seeds of every number,
    and the mean per-class F1."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for c in cells:
        groups.setdefault((c["strategy"], c["size"]), []).append(c)
    rows = []
    for (strategy, size), cs in groups.items():
        row = {"strategy": strategy, "size": size, "seeds": sorted(c["seed"] for c in cs), "n_test": cs[0]["metrics"]["n_test"]}
        for k in NUMBERS:
            row[k], row[k + "_std"] = _mean_std([c["metrics"][k] for c in cs])
        row["per_class_f1"] = {cl: float(np.mean([c["metrics"]["per_class_f1"][cl] for c in cs])) for cl in classes}
        rows.append(row)
    return rows


def curves(rows: list[dict], strategies: list) -> dict[str, list[dict]]:
    """Each strategy's learning curve: size, accuracy and macro-F1 (with spreads), its 0-example
    point taken from its `at_zero` strategy where it has one and that cell was run."""
    by = {(r["strategy"], r["size"]): r for r in rows}
    keep = ("size", "accuracy", "accuracy_std", "macro_f1", "macro_f1_std", "latency_p50_ms")
    out = {}
    for s in strategies:
        zero = by.get((s.at_zero or s.name, 0))
        pts = ([zero] if zero else []) + sorted((r for (name, n), r in by.items() if name == s.name and n > 0), key=lambda r: r["size"])
        out[s.name] = [{k: p[k] for k in keep} for p in pts]
    return out


def majority_baseline(gold: list[str], train_labels: list[str], classes: list[str]) -> dict:
    """Always answering the training split's most common class."""
    top = max(classes, key=train_labels.count)
    pred = [top] * len(gold)
    return {"label": top, "accuracy": accuracy(gold, pred), "macro_f1": macro_f1(gold, pred, classes)}
