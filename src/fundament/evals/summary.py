"""From cached cell records to numbers: each cell's metrics (metrics.py), their mean and spread over
seeds, and the learning curves (a strategy's 0-example point borrowed from its `at_zero`).
Plain data in, plain data out: what results.json holds and the report prints.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .metrics import accuracy, expected_calibration_error, macro_f1, per_class_f1

NUMBERS = [
    "accuracy",
    "macro_f1",
    "ece",
    "latency_p50_ms",
    "latency_p95_ms",
    "throughput_per_s",
    "train_s",
    "peak_memory_mb",
    "size_mb",
]


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


def summarize(cells: list[dict], classes: list[str]) -> list[dict]:
    """One row per (strategy, size): the mean and standard deviation over seeds of every number,
    and the mean per-class F1."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for c in cells:
        groups.setdefault((c["strategy"], c["size"]), []).append(c)
    rows = []
    for (strategy, size), cs in groups.items():
        row: dict[str, Any] = {
            "strategy": strategy,
            "size": size,
            "seeds": sorted(c["seed"] for c in cs),
            "n_test": cs[0]["metrics"]["n_test"],
        }
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
        pts = ([zero] if zero else []) + sorted(
            (r for (name, n), r in by.items() if name == s.name and n > 0), key=lambda r: r["size"]
        )
        out[s.name] = [{k: p[k] for k in keep} for p in pts]
    return out


def majority_baseline(gold: list[str], train_labels: list[str], classes: list[str]) -> dict:
    """Always answering the training split's most common class."""
    top = max(classes, key=train_labels.count)
    pred = [top] * len(gold)
    return {"label": top, "accuracy": accuracy(gold, pred), "macro_f1": macro_f1(gold, pred, classes)}


# What each strategy is, for the verdict: the user's question is which *kind* of adaptation to use.
FAMILIES = {
    "zero-shot": "prompting",
    "few-shot-random": "prompting",
    "few-shot-nearest": "prompting",
    "remote-zero-shot": "prompting",
    "remote-few-shot-random": "prompting",
    "remote-few-shot-nearest": "prompting",
    "lora": "fine-tuning",
    "probe-embedding": "probe",
    "probe-hidden": "probe",
    "tfidf": "from scratch",
}
CLOSE = 0.02  # accuracy within this of the best counts as "as good" (2 points: 4 of 200 test examples)


def verdict(rows: list[dict]) -> dict:
    """Which adaptation wins, from a task's summary rows: the best row overall and per family,
    from how many labelled examples fine-tuning beats every prompt (at that size or fewer), and
    the fastest row within CLOSE of the best accuracy. Plain data; the report words it."""
    if not rows:
        return {}
    key = lambda r: (r["accuracy"], -(r["latency_p50_ms"] or float("inf")))  # noqa: E731  ties: the faster
    pick = lambda r: {k: r[k] for k in ("strategy", "size", "accuracy", "latency_p50_ms", "train_s")}  # noqa: E731
    best = max(rows, key=key)
    families: dict[str, dict] = {}
    for r in rows:
        f = FAMILIES.get(r["strategy"], r["strategy"])
        if f not in families or key(r) > key(families[f]):
            families[f] = r
    overtakes = None  # the smallest size where fine-tuning beats the best prompt with as many examples or fewer
    for r in sorted((r for r in rows if FAMILIES.get(r["strategy"]) == "fine-tuning"), key=lambda r: r["size"]):
        prompts = [p["accuracy"] for p in rows if FAMILIES.get(p["strategy"]) == "prompting" and p["size"] <= r["size"]]
        if prompts and r["accuracy"] > max(prompts):
            overtakes = {**pick(r), "best_prompt_accuracy": max(prompts)}
            break
    close = [r for r in rows if r["accuracy"] >= best["accuracy"] - CLOSE and r["latency_p50_ms"] is not None]
    fastest = min(close, key=lambda r: (r["latency_p50_ms"], r["size"])) if close else best
    return {
        "best": pick(best),
        "families": {f: pick(r) for f, r in families.items()},
        "fine_tuning_overtakes": overtakes,
        "fastest_close_to_best": pick(fastest),
        "close": CLOSE,
    }
