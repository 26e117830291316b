"""Load and faults through the real server on the default model at its default settings: 64
concurrent streams with distinct prompts get the tokens each gets alone, 30 clients that hang up
after their first chunk leave nothing held in the engine, and SIGTERM with 64 requests in flight
ends the server within seconds. (SIGKILL of the worker mid-job: tests/test_fine_tuning_crash.py.)"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import httpx
import pytest
from conftest import ServerProcess
from openai import AsyncOpenAI

from fundament.models.device import cpu_flags

pytestmark = pytest.mark.slow

ENGINE = "smollm2-135m-instruct"
WORDS = "the a river model story cat dog data light music city night road paper science history why how".split()


def cpu_features() -> str:
    """The CPU features that decide which kernels run (and so how they round)."""
    flags = cpu_flags()
    if not flags:
        return "unknown"
    return ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("avx512_bf16", "amx_bf16", "amx_tile"))


def distinct_prompts(n: int) -> list[str]:
    rng = random.Random(13)  # lengths from a few tokens to ~80, so prefill chunks and decode rows mix
    return [
        f"Question {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randrange(2, 70))) + "?" for i in range(n)
    ]


async def stream_text(client: AsyncOpenAI, prompt: str) -> str:
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}], max_tokens=32, temperature=0, stream=True
    )
    return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])


def test_64_concurrent_streams_equal_each_alone(server, record_property):
    prompts = distinct_prompts(64)

    async def main():
        client = AsyncOpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0, timeout=300)
        alone = [await stream_text(client, p) for p in prompts]
        together = await asyncio.gather(*(stream_text(client, p) for p in prompts))
        return alone, together

    alone, together = asyncio.run(main())
    differ = [i for i, (a, b) in enumerate(zip(alone, together)) if a != b]
    record_property("cpu_features", cpu_features())
    print(f"greedy mismatches at 64-way concurrency: {len(differ)} of 64 ({cpu_features()})")
    assert not differ, (
        f"{len(differ)} of 64 differ from the same prompt alone on a CPU with {cpu_features()}: first {prompts[differ[0]]!r}"
    )
    assert len({t for t in alone}) > 32  # distinct prompts, distinct answers: a real comparison


def test_clients_that_hang_up_after_their_first_chunk_leave_nothing_held(server):
    async def hang_up(i: int):
        async with httpx.AsyncClient(timeout=60) as c:
            body = {
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": f"Tell a long story about river {i}."}],
                "max_tokens": 400,
                "stream": True,
            }
            async with c.stream("POST", f"{server.base_url}/chat/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        return True  # leaving the block closes the connection mid-stream

    async def main():
        return await asyncio.gather(*(hang_up(i) for i in range(30)))

    assert all(asyncio.run(main()))
    deadline = time.time() + 20
    while True:
        engine = server.health()["engines"][ENGINE]
        if (engine["running"], engine["waiting"], engine["kv_reserved_tokens"]) == (0, 0, 0) or time.time() > deadline:
            break
        time.sleep(0.2)
    assert (engine["running"], engine["waiting"], engine["kv_reserved_tokens"]) == (0, 0, 0)


def test_sigterm_with_64_requests_in_flight_ends_the_server_within_10_s(tmp_path):
    srv = ServerProcess([], tmp_path / "home")
    try:

        async def one(c: httpx.AsyncClient, i: int) -> str:
            body = {
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": f"Write a long story number {i}."}],
                "max_tokens": 1000,
                "stream": True,
            }
            try:
                async with c.stream("POST", f"{srv.base_url}/chat/completions", json=body) as r:
                    async for _ in r.aiter_lines():
                        pass
                return "finished"
            except httpx.HTTPError:
                return "aborted"

        async def main():
            async with httpx.AsyncClient(timeout=120) as c:
                tasks = [asyncio.create_task(one(c, i)) for i in range(64)]
                for _ in range(200):  # until all 64 are in the engine
                    await asyncio.sleep(0.1)
                    engine = (await c.get(f"http://127.0.0.1:{srv.port}/health")).json()["engines"][ENGINE]
                    if engine["running"] + engine["waiting"] >= 64:
                        break
                t0 = time.perf_counter()
                os.kill(srv.proc.pid, signal.SIGTERM)
                await asyncio.to_thread(srv.proc.wait, 30)
                took = time.perf_counter() - t0
                return took, await asyncio.gather(*tasks)

        took, outcomes = asyncio.run(main())
        print(f"SIGTERM with 64 requests in flight: the server exited after {took:.1f} s")
        assert took < 10
        assert outcomes.count("aborted") >= 60  # 1,000 tokens each: none could have finished
    finally:
        srv.stop()
