"""The engine on a tiny random Llama: equality with HF transformers, batch invariance, chunked
prefill, memory bound, queue limit, aborts, seeds and logits processors."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch
from conftest import DEVICE

from fundament.config import EngineConfig
from fundament.engine import Engine, EngineRequest, SamplingParams
from fundament.engine.outbox import LoopInbox
from fundament.errors import ContextLengthExceededError, QueueFullError
from fundament.models.llama import KVCache, LlamaModel


def run_all(engine: Engine, reqs: list[EngineRequest], max_steps: int = 10_000) -> None:
    for r in reqs:
        engine.submit(r)
    for _ in range(max_steps):
        if all(r.finished for r in reqs):
            return
        engine.step()
    raise AssertionError("engine did not finish")


def greedy(prompt, n, **kw):
    outs = []
    return EngineRequest(
        list(prompt), SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw), outs.append
    ), outs


def tokens(outs):
    return [o.token_id for o in outs]


@pytest.fixture(scope="module")
def model(tiny_llama, native_decode):
    return LlamaModel.from_dir(tiny_llama, device=DEVICE, native_decode=native_decode)


def test_greedy_equals_transformers_generate(tiny_llama, model):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).to(DEVICE).eval()
    prompt = [5, 17, 99, 3, 250, 41, 7]
    ref = hf.generate(torch.tensor([prompt], device=DEVICE), max_new_tokens=64, min_new_tokens=64, do_sample=False)[
        0, len(prompt) :
    ].tolist()
    engine = Engine(model, EngineConfig(), eos_token_ids=[2])
    req, outs = greedy(prompt, 64)
    run_all(engine, [req])
    assert tokens(outs) == ref


def test_batch_of_16_equals_each_alone(model):
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randrange(1, 60))] for _ in range(16)]
    alone = []
    for p in prompts:
        req, outs = greedy(p, 24)
        run_all(Engine(model, EngineConfig(), [2]), [req])
        alone.append(tokens(outs))
    engine = Engine(model, EngineConfig(max_num_batched_tokens=64), [2])
    pairs = [greedy(p, 24) for p in prompts]
    run_all(engine, [r for r, _ in pairs])
    assert [tokens(o) for _, o in pairs] == alone


def test_chunked_prefill_equals_one_shot(model):
    prompt = list(range(3, 203))
    one, o1 = greedy(prompt, 16)
    run_all(Engine(model, EngineConfig(max_num_batched_tokens=512), [2]), [one])
    chunked, o2 = greedy(prompt, 16)
    engine = Engine(model, EngineConfig(max_num_batched_tokens=37), [2])
    run_all(engine, [chunked])
    assert tokens(o1) == tokens(o2)
    assert engine.steps >= 200 // 37 + 16


def test_requests_wait_when_kv_budget_is_full(model):
    engine = Engine(model, EngineConfig(kv_cache_tokens=100), [2])
    reqs = [greedy([3] * 20, 30)[0] for _ in range(4)]  # 50 tokens each: two fit at once
    for r in reqs:
        engine.submit(r)
    peak = 0
    while not all(r.finished for r in reqs):
        engine.step()
        peak = max(peak, len(engine.running))
        assert engine._reserved <= 100
    assert peak == 2


def test_queue_limit_raises_queue_full(model):
    engine = Engine(model, EngineConfig(max_queue=2), [2])
    engine.submit(greedy([3], 2)[0])
    engine.submit(greedy([3], 2)[0])
    with pytest.raises(QueueFullError):
        engine.submit(greedy([3], 2)[0])


def test_check_fits_names_the_limit(model):
    engine = Engine(model, EngineConfig(), [2])
    with pytest.raises(ContextLengthExceededError, match="512"):
        engine.check_fits(500, 20)


def test_abort_leaves_the_batch_at_once(model):
    engine = Engine(model, EngineConfig(), [2])
    keep, keep_out = greedy([5, 6], 10)
    gone, gone_out = greedy([7, 8], 1000)
    engine.submit(keep)
    engine.submit(gone)
    engine.step()
    engine.abort(gone.request_id)
    engine.step()
    assert [r.request_id for r in engine.running] == [keep.request_id]
    assert engine._reserved == keep.reserved_tokens
    assert len(gone_out) == 1


def test_same_seed_same_sample_different_seed_differs(model):
    def sample(seed):
        outs = []
        req = EngineRequest(
            [5, 9, 11], SamplingParams(max_tokens=20, temperature=1.5, seed=seed, ignore_eos=True), outs.append
        )
        run_all(Engine(model, EngineConfig(), [2]), [req])
        return tokens(outs)

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_logit_bias_forces_a_token(model):
    req, outs = greedy([5, 9], 5, logit_bias={123: 100.0})
    run_all(Engine(model, EngineConfig(), [2]), [req])
    assert tokens(outs) == [123] * 5


def test_frequency_penalty_changes_repetition(model):
    plain, o1 = greedy([5, 9], 30)
    pen, o2 = greedy([5, 9], 30, frequency_penalty=2.0, presence_penalty=2.0)
    run_all(Engine(model, EngineConfig(), [2]), [plain, pen])
    assert len(set(tokens(o2))) > len(set(tokens(o1)))


def test_stop_token_ends_with_stop(model):
    req, outs = greedy([5, 9], 50)
    run_all(Engine(model, EngineConfig(), [2]), [req])
    target = tokens(outs)[3]
    req2, outs2 = greedy([5, 9], 50, stop_token_ids=[target])
    run_all(Engine(model, EngineConfig(), [2]), [req2])
    assert tokens(outs2)[-1] == target and outs2[-1].finish_reason == "stop"
    assert len(outs2) == tokens(outs).index(target) + 1


def test_logprobs_are_log_softmax_of_the_row(model):
    req, outs = greedy([5, 9, 4], 3, logprobs=5)
    run_all(Engine(model, EngineConfig(), [2]), [req])
    first = outs[0]
    assert first.logprob == pytest.approx(first.top_logprobs[0][1])  # greedy picks the top token
    assert [t for t, _ in first.top_logprobs][0] == first.token_id
    lps = [v for _, v in first.top_logprobs]
    assert lps == sorted(lps, reverse=True) and all(v <= 0 for v in lps)


def test_async_generate_on_the_thread_and_cancel(model):
    engine = Engine(model, EngineConfig(), [2])
    engine.start()

    async def main():
        got = []
        async for out in engine.generate([5, 6, 7], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)):
            got.append(out)
        gen = engine.generate([5, 6, 7], SamplingParams(max_tokens=10_000 - 10, temperature=0, ignore_eos=True))
        await gen.__anext__()
        await gen.aclose()  # a client that went away
        for _ in range(100):
            if not engine.running and not engine.waiting:
                break
            await asyncio.sleep(0.02)
        return got

    try:
        got = asyncio.run(main())
    finally:
        engine.stop()
    assert [o.finish_reason for o in got] == [None] * 4 + ["length"]
    assert not engine.running and engine._reserved == 0


def test_a_steps_outputs_wake_the_event_loop_once_and_arrive_in_order(model, monkeypatch):
    """8 streams on one asyncio loop: each step hands the loop all its outputs in one batch (the
    loop's thread then wakes once a step, not once a row while the engine thread still samples),
    and every stream still gets its own tokens, in order, equal to the same request run alone."""
    engine = Engine(model, EngineConfig(), [2])
    prompts = [[5 + i, 6, 7 * i + 1] for i in range(8)]
    alone = []
    for p in prompts:
        req, outs = greedy(p, 12)
        run_all(engine, [req])
        alone.append(tokens(outs))
    engine.start()
    wakes = []

    plain = LoopInbox.send

    def counted(inbox, batch):
        wakes.append(engine.steps)
        return plain(inbox, batch)

    monkeypatch.setattr(LoopInbox, "send", counted)

    async def main():
        async def one(p):
            return [
                o.token_id
                async for o in engine.generate(p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
            ]

        return await asyncio.gather(*(one(p) for p in prompts))

    try:
        got = asyncio.run(main())
    finally:
        engine.stop()
    assert got == alone
    assert len(wakes) == len(set(wakes))  # at most one wake-up per step
    assert 12 <= len(wakes) < 8 * 12


def test_memory_stays_within_the_bound_under_64_long_requests(model):
    """64 concurrent requests that each want 300 tokens against a 4,000-token KV budget: the
    allocated caches never exceed the bound, and every request still completes."""
    config = EngineConfig(kv_cache_tokens=4000, max_num_batched_tokens=256)
    engine = Engine(model, config, [2])
    per_token = KVCache.bytes_per_token(model.cfg, model.dtype)
    reqs = [greedy([3 + i % 50] * (20 + i), 280 - i)[0] for i in range(64)]
    for r in reqs:
        engine.submit(r)
    peak_bytes, peak_running = 0, 0
    while not all(r.finished for r in reqs):
        engine.step()
        allocated = sum(r.cache.nbytes() for r in engine.running if r.cache is not None)
        peak_bytes, peak_running = max(peak_bytes, allocated), max(peak_running, len(engine.running))
        assert engine._reserved <= config.kv_cache_tokens
        assert allocated <= config.kv_cache_tokens * per_token
    assert 1 < peak_running < 64  # some ran together, the rest waited for memory
    assert peak_bytes > config.kv_cache_tokens * per_token // 2  # and the budget was really used


# ---- scoring requests: one prompt, many continuations, one prefill ------------------------------


def score_request(prompt, continuations):
    from fundament.engine.tree import TokenTree

    outs = []
    req = EngineRequest(
        list(prompt), SamplingParams(max_tokens=0), outs.append, tree=TokenTree(list(prompt), continuations)
    )
    return req, outs


def separate_logprobs(model, prompt, cont, **config):
    """The reference: prompt + continuation as one full request with prompt_logprobs."""
    outs = []
    req = EngineRequest(
        list(prompt) + cont, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=True), outs.append
    )
    run_all(Engine(model, EngineConfig(**config), [2]), [req])
    return outs[0].prompt_logprobs[len(prompt) :]


CONTINUATIONS = [[40, 41, 2], [40, 99, 2], [7, 2], [40, 41, 2, 9], [300], [40, 41, 2]]  # shared prefixes, a duplicate


@pytest.mark.parametrize("chunk", [512, 5, 1])
def test_scored_continuations_equal_separate_full_requests(model, chunk):
    """Every continuation's log-likelihoods from one tree request equal those of its own full
    request, however the tree is chunked (chunk 1: every step a single masked token)."""
    prompt = [5, 17, 99, 3, 250, 41, 7, 12, 13]
    req, outs = score_request(prompt, CONTINUATIONS)
    engine = Engine(model, EngineConfig(max_num_batched_tokens=chunk), [2])
    run_all(engine, [req])
    assert len(outs) == 1 and engine._reserved == 0 and not engine.running
    got = outs[0].logprobs
    for cont, lps in zip(CONTINUATIONS, got):
        assert lps == pytest.approx(separate_logprobs(model, prompt, cont), abs=1e-4)
    assert got[0] == got[5]  # the duplicate is scored once
    # The prompt and shared prefixes are stored once: 9 + (40 41 2) + (99 2) + (7 2) + (9) + (300).
    assert len(req.tree) == 18 and req.reserved_tokens == 18


@pytest.fixture(scope="module")
def fast_model(tiny_llama, native_decode):
    """The fast configuration (bfloat16 with int8 decode copies), where a row's result must not
    depend on its batch bit for bit."""
    return LlamaModel.from_dir(
        tiny_llama, dtype=torch.bfloat16, device=DEVICE, int8_decode=True, native_decode=native_decode
    )


def test_score_result_does_not_depend_on_the_batch(fast_model):
    model = fast_model
    prompt = [5, 17, 99, 3, 250, 41, 7]
    alone, a_outs = score_request(prompt, CONTINUATIONS)
    run_all(Engine(model, EngineConfig(max_num_batched_tokens=8), [2]), [alone])
    rng = random.Random(1)
    others = [greedy([rng.randrange(3, 512) for _ in range(rng.randrange(1, 30))], 12)[0] for _ in range(6)]
    scored, s_outs = score_request(prompt, CONTINUATIONS)
    engine = Engine(model, EngineConfig(max_num_batched_tokens=8), [2])
    for r in others[:3]:
        engine.submit(r)
    engine.step()  # the scoring request joins a batch that is already decoding
    run_all(engine, [scored, *others[3:]])
    assert s_outs[0].logprobs == a_outs[0].logprobs  # bit for bit


def test_score_from_async_matches_and_abort_frees_everything(model):
    prompt = [5, 17, 99, 3]
    engine = Engine(model, EngineConfig(max_num_batched_tokens=4), [2])
    engine.start()

    async def main():
        got = await engine.score(prompt, [[40, 41], [7]])
        task = asyncio.ensure_future(engine.score(list(range(3, 300)), [[40] * 50, [41] * 50]))
        await asyncio.sleep(0.05)
        task.cancel()  # a client that went away mid-prefill
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            if not engine.running and not engine.waiting:
                break
            await asyncio.sleep(0.02)
        return got

    try:
        got = asyncio.run(main())
    finally:
        engine.stop()
    assert got[0] == pytest.approx(separate_logprobs(model, prompt, [40, 41]), abs=1e-4)
    assert not engine.running and engine._reserved == 0


def test_score_refuses_what_cannot_fit(model):
    engine = Engine(model, EngineConfig(kv_cache_tokens=100), [2])
    with pytest.raises(ContextLengthExceededError, match="512"):
        asyncio.run(engine.score([3] * 500, [[4] * 20]))
    with pytest.raises(ContextLengthExceededError, match="kv_cache_tokens"):
        asyncio.run(engine.score([3] * 50, [[4] * 30, [5] * 30]))  # 110 slots, though only 80 deep


def test_device_setting_resolves_or_says_what_is_wrong():
    from fundament.errors import InvalidRequestError
    from fundament.models.device import resolve_device

    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(InvalidRequestError, match="torch sees"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")  # one past the last GPU (cuda:0 where there is none)
    with pytest.raises(InvalidRequestError, match="not a device"):
        resolve_device("gpu0")


def test_min_p_and_repetition_penalty_as_vllm_defines_them():
    import torch

    from fundament.engine.sampling import SamplingParams, sample_row

    logits = torch.tensor([2.0, 1.9, -1.0, 0.5])  # probs ~ [0.47, 0.43, 0.02, 0.10]
    p = SamplingParams(temperature=1.0, min_p=0.5)
    drawn = {sample_row(logits.clone(), p, torch.Generator().manual_seed(s)) for s in range(200)}
    assert drawn == {0, 1}  # tokens below half the top one's probability are never drawn
    rp = SamplingParams(repetition_penalty=2.0).processors(prompt_ids=[0])
    out = rp[0]([2], logits.clone())  # token 0 (prompt) and 2 (output) penalised
    assert out.tolist() == pytest.approx([1.0, 1.9, -2.0, 0.5])
    assert SamplingParams().processors([0, 1]) == []  # off by default


def test_waiting_requests_start_by_priority_then_arrival(model):
    """A batch's sequences (priority 1) wait behind interactive ones (priority 0) that arrive later."""
    engine = Engine(model, EngineConfig(max_num_seqs=1), eos_token_ids=[2])
    started: list[str] = []

    def req(name, priority):
        r = EngineRequest([5, 6, 7], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, priority=priority),
                          lambda o, n=name: started.append(n) if n not in started else None)  # fmt: skip
        return r

    reqs = [req("batch-1", 1), req("batch-2", 1), req("chat-1", 0), req("chat-2", 0)]
    run_all(engine, reqs)
    assert started == ["chat-1", "chat-2", "batch-1", "batch-2"]  # one slot: the later chats start first
