"""The engine on the real default model: float32 greedy output equals transformers' own `generate`
token for token, and the fast default (bfloat16 with int8 decode weights) stays close to it."""

from __future__ import annotations

import pytest
import torch

from fundament.config import EngineConfig
from fundament.engine import Engine, EngineRequest, SamplingParams
from fundament.models.llama import LlamaModel, Segment
from fundament.models.tokenizer import ChatTokenizer

pytestmark = pytest.mark.slow


def greedy_tokens(model, prompt, n, config=None):
    outs = []
    req = EngineRequest(prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), outs.append)
    engine = Engine(model, config or EngineConfig(), [2])
    engine.submit(req)
    while not req.finished:
        engine.step()
    return [o.token_id for o in outs]


@pytest.fixture(scope="module")
def prompt(smollm_dir):
    return ChatTokenizer(smollm_dir).apply_chat_template(
        [{"role": "user", "content": "Explain what a foundation model is."}]
    )


def test_float32_greedy_equals_transformers_generate_for_64_tokens(smollm_dir, prompt):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(smollm_dir, dtype=torch.float32).eval()
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=64, min_new_tokens=64, do_sample=False)[
        0, len(prompt) :
    ].tolist()
    assert greedy_tokens(LlamaModel.from_dir(smollm_dir), prompt, 64) == ref


def next_token_logits(model, seq, n_prompt):
    """Teacher-forced predictions: prefill the prompt, then feed seq one token at a time (the
    decode path, which uses the int8 weights in the fast configuration)."""
    cache, preds = model.new_cache(len(seq)), []
    model.forward(torch.tensor(seq[:n_prompt]), [Segment(cache, 0, n_prompt)], torch.tensor([n_prompt - 1]))
    for pos in range(n_prompt, len(seq)):
        preds.append(model.forward(torch.tensor([seq[pos]]), [Segment(cache, pos, 1)], torch.tensor([0]))[0])
    return preds


def test_bfloat16_int8_logits_stay_close_to_float32(smollm_dir, prompt):
    fp32 = LlamaModel.from_dir(smollm_dir)
    fast = LlamaModel.from_dir(smollm_dir, dtype=torch.bfloat16, int8_decode=True)
    seq = prompt + greedy_tokens(fp32, prompt, 32)
    ref, got = next_token_logits(fp32, seq, len(prompt)), next_token_logits(fast, seq, len(prompt))
    for a, b in zip(ref, got):
        assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.98
    agree = sum(int(a.argmax() == b.argmax()) for a, b in zip(ref, got))
    assert agree >= 0.9 * len(ref)


@pytest.mark.parametrize("path", ["bf16", "float32-int8-rows"])
def test_fast_path_output_does_not_depend_on_the_batch(smollm_dir, path):
    """bfloat16 + int8 decode, and float32 with int8 rows for generated tokens and a bf16 KV cache
    (the default on a CPU without AVX512-BF16): 16 prompts of different lengths (crossing the
    attention buckets) give the same greedy tokens batched together as each alone."""
    import random

    if path == "bf16":
        fast = LlamaModel.from_dir(smollm_dir, dtype=torch.bfloat16, int8_decode=True)
        if fast.native and torch.ops.fundament.qgemm_available():  # the default path: the packed kernel
            assert all(layer[name].packed is not None for layer in fast.layers for name in fast.LORA_TARGETS)
    else:
        fast = LlamaModel.from_dir(smollm_dir, kv_dtype=torch.bfloat16, int8_activations=True)
        if not fast.int8_rows:
            pytest.skip("no native AVX2 kernel here")
    tok = ChatTokenizer(smollm_dir)
    rng = random.Random(0)
    words = "the a model river city light small code green runs fast over under music data".split()
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": " ".join(rng.choice(words) for _ in range(rng.randrange(2, 120)))}]
        )
        for _ in range(16)
    ]
    config = EngineConfig(max_num_batched_tokens=96)  # long prompts prefill in several chunks
    alone = [greedy_tokens(fast, p, 24, config) for p in prompts]
    engine = Engine(fast, config, [2])
    generated = []  # per forward: how many of its segments were generated tokens, and their place
    forward = fast.forward

    def spy(ids, segments, rows, n_sampled=None):
        flags = [s.generated for s in segments]
        generated.append((sum(flags), flags == sorted(flags, reverse=True)))
        return forward(ids, segments, rows, n_sampled)

    fast.forward = spy
    outs = [[] for _ in prompts]
    reqs = [
        EngineRequest(p, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True), o.append)
        for p, o in zip(prompts, outs)
    ]
    for r in reqs:
        engine.submit(r)
    while not all(r.finished for r in reqs):
        engine.step()
    assert [[o.token_id for o in out] for out in outs] == alone
    # every token after each prompt's first was fed back as a generated one, in front of the batch
    assert sum(n for n, _ in generated) == 16 * 23 and all(first for _, first in generated)
