"""Prefix caching: a prompt that starts like a recent one copies that prefix's keys and values
instead of computing them, and its tokens are exactly those it gets without the cache (greedy,
prompt_logprobs, LoRA adapters kept apart); the cache keeps to its token budget, least recently
used first. On a tiny Llama whose weights are exact in int4, the default CPU path (the native
packed kernel computes every row alone), and on the real server through the official client."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import make_lora, make_tiny_llama
from test_engine import greedy, run_all
from test_kernel_rows import qgemm_available
from test_server_metrics import delta, scrape

from fundament.config import EngineConfig
from fundament.engine import Engine
from fundament.engine.prefix import PrefixCache, common_prefix
from fundament.models.llama import INT4_GROUP, KVCache, LlamaModel
from fundament.models.llama.config import LlamaConfig
from fundament.models.tokenizer import ChatTokenizer


def test_common_prefix_against_a_plain_loop():
    rng = random.Random(0)
    for _ in range(500):
        a = [rng.randrange(3) for _ in range(rng.randrange(0, 40))]
        b = a[: rng.randrange(0, len(a) + 1)] + [rng.randrange(3) for _ in range(rng.randrange(0, 10))]
        want = 0
        while want < min(len(a), len(b)) and a[want] == b[want]:
            want += 1
        assert common_prefix(tuple(a), b) == want


CFG = LlamaConfig(
    vocab_size=16,
    hidden_size=8,
    intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=64,
    head_dim=4,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    attention_bias=False,
)


def filled(ids: list[int]) -> KVCache:
    """A cache whose slot i holds the token at i (as keys and values), so copies can be checked."""
    cache = KVCache(CFG, torch.float32, torch.device("cpu"), 64)
    cache.reserve(len(ids))
    cache.k[:, :, : len(ids)] = torch.tensor(ids, dtype=torch.float32)[:, None]
    cache.v[:, :, : len(ids)] = -torch.tensor(ids, dtype=torch.float32)[:, None]
    return cache


def test_the_cache_copies_the_longest_prefix_and_keeps_to_its_budget():
    a = list(range(100, 150))  # 50 tokens: 3 whole blocks of 16
    pc = PrefixCache(max_tokens=110)
    pc.store("base", a, filled(a))
    pc.store("lora#1", a + [7], filled(a + [7]))
    target = KVCache(CFG, torch.float32, torch.device("cpu"), 64)
    assert pc.load("base", a[:40] + [1, 2], target) == 40
    assert target.k[0, 0, :40, 0].tolist() == a[:40] and target.v[1, 0, :40, 1].tolist() == [-t for t in a[:40]]
    assert pc.load("base", a, KVCache(CFG, torch.float32, torch.device("cpu"), 64)) == 49  # the last one left
    assert pc.load("other", a, target) == 0  # another adapter's values never match
    assert pc.load("base", a[:10] + [1] * 30, target) == 0  # less than a block in common: not looked for
    assert (pc.queries, pc.hits) == (42 + 50 + 50 + 40, 89)
    # a prompt extending a cached one replaces it; one a cached prompt starts with adds nothing
    pc.store("base", a + [3, 4], filled(a + [3, 4]))
    pc.store("base", a[:20], filled(a[:20]))
    assert pc.tokens == 51 + 52
    # over budget: the least recently used goes first (lora#1's)
    b = list(range(300, 327))
    pc.store("base", b, filled(b))
    assert pc.tokens == 52 + 27 and pc.load("lora#1", a + [7], target) == 0
    assert pc.load("base", a + [3, 4, 5], target) == 52 and pc.load("base", b, target) == 26
    # a hash only proposes: tokens that differ inside the shared blocks are never copied
    c = a[:16] + [0] + a[17:]
    assert pc.load("base", c, target) == 16


def int4_exact(path) -> None:
    """Round a saved model's projection weights to int4 levels per group of 32 inputs (a group's
    min and max among them), as a Q4_1 GGUF's are: the engine then packs every layer in int4 and
    runs every plain row alone, where prefix caching is on."""
    from safetensors.torch import load_file, save_file

    f = next(path.glob("*.safetensors"))
    state = load_file(f)
    for name, w in state.items():
        if name.endswith("_proj.weight"):
            g = w.view(w.shape[0], -1, INT4_GROUP)
            lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
            scale = (hi - lo) / 15
            state[name] = (torch.round((g - lo) / scale) * scale + lo).view_as(w).contiguous()
    save_file(state, f, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def int4_llama(tmp_path_factory):
    if not qgemm_available():
        pytest.skip("the native build has no AVX512-BF16 kernel on this CPU: no prefix caching there")
    path = make_tiny_llama(tmp_path_factory.mktemp("int4-llama"), layers=2)
    int4_exact(path)
    model = LlamaModel.from_dir(path, dtype=torch.bfloat16)
    assert model.rows_alone
    return path, model


SHARED = [random.Random(1).randrange(3, 500) for _ in range(70)]
PROMPTS = [SHARED + [random.Random(10 + i).randrange(3, 500) for _ in range(3 + 5 * i)] for i in range(6)]


def run(model, prompts, prefix_tokens, adapters=None, **kw):
    """Greedy tokens of the prompts with their logprobs (bit for bit), submitted one after another
    (each may reuse the ones before)."""
    engine = Engine(model, EngineConfig(max_num_batched_tokens=32, prefix_cache_tokens=prefix_tokens), [2])
    for name, path in (adapters or {}).items():
        engine.load_adapter(name, path)
    got = []
    for i, p in enumerate(prompts):
        req, outs = greedy(p, 12, logprobs=3, **kw)
        req.adapter = None if not adapters else list(adapters)[i % len(adapters)]
        run_all(engine, [req])
        got.append(([(o.token_id, o.logprob, o.top_logprobs) for o in outs], outs[0].prompt_logprobs))
    return got, engine


def test_reused_prefixes_give_exactly_the_tokens_computed_ones_give(int4_llama):
    _, model = int4_llama
    want, off = run(model, PROMPTS, 0)
    got, engine = run(model, PROMPTS, 4096)
    assert off.prefix is None and got == want
    stats = engine.health()["prefix_cache"]
    # every prompt after the first shares the 70 tokens; the chunks of 32 start where the copy ends
    assert stats["hit_tokens"] == 70 * (len(PROMPTS) - 1)
    assert stats["queried_tokens"] == sum(map(len, PROMPTS))
    # the same prompt again: all but its last token copied
    again, engine2 = run(model, [PROMPTS[2], PROMPTS[2]], 4096)
    assert again[0] == again[1] == want[2] and engine2.prefix.hits == len(PROMPTS[2]) - 1


def test_prompt_logprobs_are_computed_not_copied(int4_llama):
    _, model = int4_llama
    want, _ = run(model, PROMPTS[:3], 0, prompt_logprobs=1)
    got, engine = run(model, PROMPTS[:3], 4096, prompt_logprobs=1)
    assert got == want and len(got[2][1]) == len(PROMPTS[2]) and engine.prefix.hits == 0


def test_an_adapter_never_reads_another_ones_keys(int4_llama, tmp_path):
    path, model = int4_llama
    lora = make_lora(path, tmp_path / "lora", targets=("q_proj", "k_proj", "v_proj"), std=0.2)
    adapters = {"a": lora, "b": lora}  # the same weights under two names: still kept apart
    want, _ = run(model, PROMPTS[:4], 0, adapters)
    got, engine = run(model, PROMPTS[:4], 4096, adapters)
    assert got == want
    assert engine.prefix.hits == 70 * 2  # prompt 3 reuses prompt 1's (both "b"), prompt 2 prompt 0's
    for name in adapters:
        model.remove_adapter(engine.adapters[name])
    base, _ = run(model, PROMPTS[:1], 0)
    assert base[0][0] != want[0][0]  # the adapter changed the tokens: the test could tell them apart


@pytest.mark.slow
def test_a_shared_system_prompt_is_served_from_the_cache(server, client, smollm_dir):
    """The real default model through the official client: the second chat with the same system
    prompt copies it, the same chat again copies all of it, and the answers are the same."""
    system = {"role": "system", "content": "You are a terse assistant for a bicycle repair shop. " * 4}

    def ask(text):
        r = client.chat.completions.create(
            model="gpt-4o-mini", messages=[system, {"role": "user", "content": text}], max_tokens=16
        )
        return r.choices[0].message.content, r.usage.prompt_tokens

    before = scrape(server)
    ask("How do I fix a flat tire?")
    mid = scrape(server)
    first, n = ask("What oil for a chain?")
    after = scrape(server)
    again, _ = ask("What oil for a chain?")
    last = scrape(server)
    hits = "fundament:prefix_cache_hits_total"
    labels = {"model_name": "smollm2-135m-instruct"}
    assert delta(before, mid, "fundament:prefix_cache_queries_total", **labels) > 0
    template = ChatTokenizer(smollm_dir).apply_chat_template
    ids = [
        template([system, {"role": "user", "content": q}])
        for q in ("How do I fix a flat tire?", "What oil for a chain?")
    ]
    assert len(ids[1]) == n
    assert delta(mid, after, hits, **labels) == common_prefix(tuple(ids[0]), ids[1]) > 40  # the system prompt
    assert delta(after, last, hits, **labels) == n - 1
    assert again == first
