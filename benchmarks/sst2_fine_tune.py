"""Acceptance run for fine-tuning: SST-2 through the official `openai` client, end to end.

2,000 SST-2 training sentences (a seeded sample) become chat examples (user: "Determine the
sentiment of this review: '<sentence>'", assistant: `positive` or `negative`), are uploaded and
trained with default hyperparameters; then the base model and the `ft:` model answer all 872 SST-2
dev sentences through chat completions, and the label is parsed from the reply text.

    make serve &                       # or any fundament server
    OPENAI_BASE_URL=http://127.0.0.1:8000/v1 .venv/bin/python benchmarks/sst2_fine_tune.py
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from openai import OpenAI

SST2 = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "sst2"
PROMPT = "Determine the sentiment of this review: '{}'"
LABELS = {"1": "positive", "0": "negative"}


def read(split: str) -> list[tuple[str, str]]:
    with open(SST2 / f"{split}.tsv") as f:
        return [(r["sentence"].strip(), LABELS[r["label"]]) for r in csv.DictReader(f, delimiter="\t")]


def parse(reply: str) -> str | None:
    """The first of the two labels the reply names, or None if it names neither."""
    m = re.search(r"\b(positive|negative)\b", (reply or "").lower())
    return m.group(1) if m else None


def accuracy(client: OpenAI, model: str, dev: list[tuple[str, str]], workers: int) -> tuple[float, float, float]:
    def ask(item):
        r = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": PROMPT.format(item[0])}],
            max_completion_tokens=16,
            temperature=0,
        )
        return parse(r.choices[0].message.content)

    t = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        answers = list(pool.map(ask, dev))
    wall = time.perf_counter() - t
    right = sum(a == gold for a, (_, gold) in zip(answers, dev))
    unparsed = sum(a is None for a in answers)
    return right / len(dev), unparsed / len(dev), len(dev) / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--examples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=16, help="concurrent requests while evaluating")
    ap.add_argument("--dev", type=int, default=0, help="evaluate on the first N dev sentences (0: all 872)")
    a = ap.parse_args()
    client = OpenAI(
        base_url=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"),
        api_key=os.environ.get("OPENAI_API_KEY", "none"),
        timeout=600,
    )

    train = random.Random(a.seed).sample(read("train"), a.examples)
    dev = read("dev")[: a.dev or None]
    lines = [
        json.dumps({"messages": [{"role": "user", "content": PROMPT.format(s)}, {"role": "assistant", "content": y}]})
        for s, y in train
    ]
    f = client.files.create(file=("sst2-train.jsonl", io.BytesIO("\n".join(lines).encode())), purpose="fine-tune")

    t0 = time.perf_counter()
    job = client.fine_tuning.jobs.create(model=a.model, training_file=f.id, suffix="sst2", seed=a.seed)
    print(f"job {job.id}: {len(train)} examples; following its events")
    seen = None
    while job.status not in ("succeeded", "failed", "cancelled"):
        time.sleep(5)
        job = client.fine_tuning.jobs.retrieve(job.id)
        events = client.fine_tuning.jobs.list_events(job.id, limit=1).data
        if events and events[0].id != seen:
            seen = events[0].id
            print(f"  [{time.perf_counter() - t0:6.0f}s] {job.status}: {events[0].message}", flush=True)
    train_wall = time.perf_counter() - t0
    if job.status != "succeeded":
        raise SystemExit(f"job {job.status}: {job.error}")
    hp = job.method.supervised.hyperparameters if job.method and job.method.supervised else job.hyperparameters
    print(f"trained {job.trained_tokens} tokens in {train_wall:.0f} s (hyperparameters {hp}) -> {job.fine_tuned_model}")

    for name in (a.model, job.fine_tuned_model):
        acc, unparsed, rate = accuracy(client, name, dev, a.workers)
        print(
            f"{name}: SST-2 dev accuracy {acc:.1%} ({len(dev)} sentences, {unparsed:.1%} replies name no label, {rate:.1f} answers/s)"
        )


if __name__ == "__main__":
    main()
