"""/v1/classifications on SST-2 dev from two running fundament servers on the same weights: one on
its own engine, one in front of vLLM. How often they pick the same label, how far apart their
probabilities are, their accuracies and wall times. Not a test. Start the two servers first, in
the same precision (docs/scaling.md), then:

    .venv/bin/python benchmarks/bench_vllm_classify.py http://127.0.0.1:8300/v1 http://127.0.0.1:8200/v1 --n 200
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import httpx

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "dev.tsv"
MODEL = "smollm2-135m-instruct"


def classify(base: str, texts: list[str]) -> tuple[list[dict], float]:
    t, out = time.perf_counter(), []
    for i in range(0, len(texts), 16):
        body = {"model": MODEL, "input": texts[i : i + 16], "labels": ["positive", "negative"]}
        r = httpx.post(base + "/classifications", json=body, timeout=600)
        r.raise_for_status()
        out += r.json()["data"]
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ours", help="fundament on its own engine, e.g. http://127.0.0.1:8300/v1")
    ap.add_argument("vllm", help="fundament in front of vLLM, e.g. http://127.0.0.1:8200/v1")
    ap.add_argument("--n", type=int, default=200, help="the first N sentences of SST-2 dev")
    args = ap.parse_args()
    with open(DATA, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))[: args.n]
    texts = [r["sentence"] for r in rows]
    gold = ["positive" if r["label"] == "1" else "negative" for r in rows]
    a, ta = classify(args.ours, texts)
    b, tb = classify(args.vllm, texts)
    dp = [abs(x["probabilities"]["positive"] - y["probabilities"]["positive"]) for x, y in zip(a, b)]

    def accuracy(out):
        return sum(x["label"] == g for x, g in zip(out, gold)) / len(gold)

    print(
        json.dumps(
            {
                "n": len(texts),
                "same_label": sum(x["label"] == y["label"] for x, y in zip(a, b)),
                "max_abs_dp": max(dp),
                "mean_abs_dp": sum(dp) / len(dp),
                "over_0.02": sum(d > 0.02 for d in dp),
                "accuracy_ours": accuracy(a),
                "accuracy_vllm": accuracy(b),
                "seconds_ours": round(ta, 1),
                "seconds_vllm": round(tb, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
