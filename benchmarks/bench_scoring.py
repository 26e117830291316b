"""Label scoring before and after prefix sharing: the same few-shot classification prompts scored
with one full engine request per label (prompt_logprobs, the Classifier's old path) and with one
scoring request per input (the prompt prefilled once, every label from its cache). Interleaved in
one run on the default model; prints inputs/s of each and the largest log-likelihood difference.
Not a test.

    .venv/bin/python benchmarks/bench_scoring.py [--inputs 64] [--k 8] [--threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time


async def per_label(engine, prompt: list[int], labels: list[list[int]], slots: asyncio.Semaphore) -> list[float]:
    from fundament.engine import SamplingParams

    async def one(ids):
        async with slots:
            async for out in engine.generate(
                prompt + ids, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=True)
            ):
                return sum(out.prompt_logprobs[len(prompt) :])

    return list(await asyncio.gather(*(one(ids) for ids in labels)))


async def shared(engine, prompt: list[int], labels: list[list[int]], slots: asyncio.Semaphore) -> list[float]:
    async with slots:
        return [sum(x) for x in await engine.score(prompt, labels)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--inputs", type=int, default=64)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--threads", type=int)
    args = ap.parse_args()
    from fundament.adapt.prompt import PromptFormat
    from fundament.config import ServeConfig
    from fundament.engine.engine import reserve_cpu_for_engines
    from fundament.evals.tasks import load_task
    from fundament.registry import ModelRegistry

    reserve_cpu_for_engines()
    cfg = ServeConfig()
    cfg.models = [m for m in cfg.models if m.task == "generate"]
    cfg.engine.threads = args.threads
    registry = ModelRegistry(cfg)
    registry.load_all()
    registry.start()
    lm = next(iter(registry.generators.values()))
    tok, engine = lm.tokenizer, lm.engine
    print(f"{args.inputs} inputs, k={args.k} random examples as chat turns (the old default), 32 requests in flight")
    print(
        "| task | labels | prompt tokens (mean) | one request per label | one scoring request | speed-up | max abs diff |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in ("sst2", "trec"):
        task = load_task(name)
        rng = random.Random(0)
        fmt = PromptFormat(task.instruction, task.answer_prefix, "", "turns")
        pairs = [(c, "") for c in task.classes]
        prompts = []
        for e in task.test[: args.inputs]:
            shots = [(s.text, s.label) for s in rng.sample(task.train, args.k)]
            prompts.append(tok.apply_chat_template(fmt.messages(pairs, shots, e.text)) + tok.encode(task.answer_prefix))
        labels = [tok.encode(" " + c) + tok.eos_token_ids[:1] for c in task.classes]

        async def timed(fn, prompts=prompts, labels=labels):
            slots = asyncio.Semaphore(32)
            t = time.perf_counter()
            out = await asyncio.gather(*(fn(engine, p, labels, slots) for p in prompts))
            return out, len(prompts) / (time.perf_counter() - t)

        a, before = asyncio.run(timed(per_label))
        b, after = asyncio.run(timed(shared))
        diff = max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))
        mean_len = sum(map(len, prompts)) / len(prompts)
        print(
            f"| {name} | {len(labels)} | {mean_len:.0f} | {before:.2f} inputs/s | {after:.2f} inputs/s | {after / before:.2f}x | {diff:.3f} |",
            flush=True,
        )
    registry.stop()


if __name__ == "__main__":
    main()
