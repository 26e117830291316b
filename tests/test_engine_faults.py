"""A fault in one sequence fails that request alone: its KV reservation is released, the other
sequences of the running batch finish with the tokens they would have had, and the engine serves
the next requests."""

from __future__ import annotations

import pytest
from conftest import DEVICE

from fundament.config import EngineConfig
from fundament.engine import Engine, EngineRequest, SamplingParams
from fundament.models.llama import LlamaModel


@pytest.fixture(scope="module")
def model(tiny_llama):
    return LlamaModel.from_dir(tiny_llama, device=DEVICE)


def request(prompt, n=12, **kw):
    outs = []
    return EngineRequest(
        list(prompt), SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw), outs.append
    ), outs


def drive(engine, reqs, max_steps=2000):
    for r in reqs:
        engine.submit(r)
    for _ in range(max_steps):
        if all(r.finished for r in reqs):
            return
        engine.step()
    raise AssertionError("engine did not finish")


def tokens(outs):
    return [o.token_id for o in outs if not isinstance(o, BaseException)]


PROMPTS = [[5, 17, 99, 3], list(range(20, 61)), [250, 41, 7, 7, 9]]


def alone(model, prompt):
    req, outs = request(prompt)
    drive(Engine(model, EngineConfig(), [2]), [req])
    return tokens(outs)


def test_a_processor_that_raises_mid_batch_fails_only_its_request(model):
    expected = [alone(model, p) for p in PROMPTS]
    calls = []

    def faulty(output_ids, logits):  # fails on this sequence's 5th token, mid-batch
        calls.append(len(output_ids))
        if len(output_ids) == 4:
            raise RuntimeError("injected fault")
        return logits

    engine = Engine(model, EngineConfig(), [2])
    pairs = [request(p) for p in PROMPTS]
    bad, bad_outs = request([9, 8, 7, 6, 5], logits_processors=[faulty])
    drive(engine, [pairs[0][0], bad, pairs[1][0], pairs[2][0]])
    assert isinstance(bad_outs[-1], RuntimeError) and len(tokens(bad_outs)) == 4
    assert [tokens(o) for _, o in pairs] == expected  # the others finished as if alone
    assert engine._reserved == 0 and not engine.running and not engine.waiting
    # and the engine still serves
    req, outs = request(PROMPTS[0])
    drive(engine, [req])
    assert tokens(outs) == expected[0]


def test_a_request_that_cannot_be_admitted_is_failed_and_releases_its_reservation(model):
    """A seed torch cannot take used to raise while the request was admitted: it was neither
    running nor waiting, its reservation was never given back, and its caller waited forever."""
    engine = Engine(model, EngineConfig(kv_cache_tokens=256), [2])
    bad, bad_outs = request([5, 6, 7], n=100, seed=2**70)
    good, good_outs = request(PROMPTS[0])
    drive(engine, [bad, good])
    assert isinstance(bad_outs[-1], Exception) and not tokens(bad_outs)
    assert tokens(good_outs) == alone(model, PROMPTS[0])
    assert engine._reserved == 0
    for _ in range(3):  # repeated, they would have filled the KV budget for good
        bad, bad_outs = request([5, 6, 7], n=200, seed=2**70)
        drive(engine, [bad])
        assert isinstance(bad_outs[-1], Exception)
    req, outs = request(PROMPTS[1], n=150)  # needs most of the budget
    drive(engine, [req])
    assert len(tokens(outs)) == 150 and engine._reserved == 0


def test_a_failing_forward_pass_fails_its_batch_and_the_engine_thread_goes_on(model, monkeypatch):
    """A batch-wide fault (the forward pass) fails the requests in that batch, on the engine's
    own thread; their reservations come back and the next request is served."""
    import asyncio

    real = model.forward
    state = {"calls": 0}

    def flaky(*a, **kw):
        state["calls"] += 1
        if state["calls"] == 3:
            raise RuntimeError("injected forward fault")
        return real(*a, **kw)

    engine = Engine(model, EngineConfig(), [2])
    monkeypatch.setattr(engine, "_warm_up", lambda: None)
    monkeypatch.setattr(model, "forward", flaky)
    engine.start()

    async def run(prompt):
        return [
            o.token_id
            async for o in engine.generate(prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
        ]

    async def main():
        first = await asyncio.gather(*(run(p) for p in PROMPTS), return_exceptions=True)
        return first, await run(PROMPTS[2])

    try:
        first, after = asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        engine.stop()
    assert all(isinstance(r, RuntimeError) for r in first)
    assert engine._reserved == 0
    assert after == alone(model, PROMPTS[2])
