"""The Batches API against the same requests sent one by one: N chat requests (SST-2 dev sentences,
the README's sentiment prompt, greedy, up to --max-tokens tokens) through the official client,
first as one batch (upload, create, poll until completed), then one request after another, on the
same `fundament serve`. Prints both wall times, the ratio, and whether the answers agree.

    .venv/bin/python benchmarks/bench_batch.py --requests 1000 --max-tokens 8
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

from fundament.config import fundament_cache

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "sst2" / "dev.tsv"
PROMPT = "Determine the sentiment of this review: '{}'"


def bodies(n: int, max_tokens: int) -> list[dict]:
    with open(DATA) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return [
        {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": PROMPT.format(rows[i % len(rows)]["sentence"].strip())}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        for i in range(n)
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "batch.json"))
    args = p.parse_args()

    home = tempfile.mkdtemp(prefix="bench-batch-")
    log = open(Path(home) / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "fundament.cli", "serve", "--port", str(args.port), "--log-level", "warning"],
        # a scratch home, the user's cache: no second GGUF dequantization
        env={**os.environ, "FUNDAMENT_HOME": home, "FUNDAMENT_CACHE": str(fundament_cache())},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{args.port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{args.port}/v1", api_key="x", timeout=600)
        reqs = bodies(args.requests, args.max_tokens)
        lines = "".join(
            json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": b}) + "\n"
            for i, b in enumerate(reqs)
        )
        c.chat.completions.create(**reqs[0])  # warm
        t = time.perf_counter()
        f = c.files.create(file=("batch.jsonl", lines.encode()), purpose="batch")
        batch = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        while batch.status not in ("completed", "failed", "cancelled", "expired"):
            time.sleep(0.5)
            batch = c.batches.retrieve(batch.id)
        batch_s = time.perf_counter() - t
        out = [json.loads(x) for x in c.files.content(batch.output_file_id).text.splitlines()]
        batched = {o["custom_id"]: o["response"]["body"]["choices"][0]["message"]["content"] for o in out}
        print(f"batch of {args.requests}: {batch_s:.1f} s ({batch.request_counts})", flush=True)
        t = time.perf_counter()
        one_by_one = {f"r{i}": c.chat.completions.create(**b).choices[0].message.content for i, b in enumerate(reqs)}
        serial_s = time.perf_counter() - t
        same = sum(batched.get(k) == v for k, v in one_by_one.items())
        print(
            f"one by one: {serial_s:.1f} s; batch {serial_s / batch_s:.2f}x faster; same answers {same}/{args.requests}"
        )
        flags = Path("/proc/cpuinfo").read_text()
        result = {
            "requests": args.requests,
            "max_tokens": args.max_tokens,
            "batch_s": batch_s,
            "one_by_one_s": serial_s,
            "speedup": serial_s / batch_s,
            "same_answers": same,
            "cpu": platform.machine(),
            "cores": os.cpu_count(),
            "avx512_bf16": "avx512_bf16" in flags,
            "amx_bf16": "amx_bf16" in flags,
            "date": time.strftime("%Y-%m-%d %H:%M"),
        }
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    finally:
        server.terminate()
        server.wait(30)
    shutil.rmtree(home, ignore_errors=True)  # kept, with the server's log, where the run failed


if __name__ == "__main__":
    main()
