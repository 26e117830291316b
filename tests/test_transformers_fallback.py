"""The transformers fallback (models/transformers_model.py): architectures the native engine does
not take run through transformers' own forward under fundament's engine (tested here too on Gemma
2/3, which the native engine takes, for the fallback's sake: soft-capping, sliding windows). Each tested on a tiny
random model made from its own transformers config class: float32 greedy tokens equal
transformers' `generate` for 32 steps and logits equal its forward; scored continuations equal
its log-probabilities; a PEFT adapter equals PEFT's merged model (two adapters in one batch, each
its own); 16 requests together equal each alone; the registry picks the path and says so."""

from __future__ import annotations

import json
import random

import pytest
import torch
from test_engine import greedy, run_all, score_request, tokens
from test_model_families import SHAPE as FAMILY_SHAPE
from test_model_families import make_random

from fundament.config import EngineConfig
from fundament.engine import Engine
from fundament.errors import ConfigError
from fundament.models.llama import LlamaModel, Segment
from fundament.models.transformers_model import TransformersModel

SHAPE = dict(vocab_size=256, bos_token_id=1, eos_token_id=None, pad_token_id=0)
# the decoder sizes of the native families' tiny models (test_model_families.py)
DECODER_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
DECODER = {k: FAMILY_SHAPE[k] for k in (*DECODER_KEYS, "max_position_embeddings")}
FALLBACK = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=64, n_layer=2, n_head=4, n_positions=256)),
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=128,
            max_position_embeddings=256,
            word_embed_proj_dim=64,
        ),
    ),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(DECODER, head_dim=16, sliding_window=16),  # shorter than the test's sequences: the local layers slide
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(DECODER, head_dim=16, sliding_window=16),
    ),
    # GPT-NeoX (Pythia): parallel attention and MLP, a rotary embedding over a quarter of each head
    "gpt-neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        # 4 layers: with 2, this random one repeats a single token
        dict(DECODER, rotary_pct=0.25, tie_word_embeddings=False, num_hidden_layers=4),
    ),
}
PROMPT = [5, 17, 99, 3, 250, 41, 7, 64, 12]


def make_model(path, family: str, seed: int = 0, **overrides):
    config_cls, model_cls, shape = FALLBACK[family]
    return make_random(path, config_cls, model_cls, {**SHAPE, **shape, **overrides}, seed)


@pytest.fixture(scope="module", params=list(FALLBACK))
def family(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return request.param, path, make_model(path, request.param)


def test_the_registry_takes_the_native_engine_where_it_can_and_transformers_elsewhere(family, tiny_llama, tmp_path):
    from fundament.registry import load_weights

    name, path, _ = family
    config = EngineConfig(dtype="float32")
    # Gemma 2/3 are native families (test_model_families.py); the fallback runs them exactly too (below)
    assert isinstance(load_weights(name, path, config), LlamaModel if name.startswith("gemma") else TransformersModel)
    assert isinstance(load_weights("llama", tiny_llama, config), LlamaModel)
    # what transformers cannot run as a causal LM is a config error naming the directory
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(ConfigError, match="cannot load .* as a causal LM"):
        load_weights("bert", tmp_path, config)


def test_float32_equals_transformers_generate_and_its_logits(family):
    name, path, hf = family
    ref = hf.generate(torch.tensor([PROMPT]), max_new_tokens=32, do_sample=False)[0].tolist()
    model = TransformersModel.from_dir(path, dtype=torch.float32)
    req, outs = greedy(PROMPT, 32)
    run_all(Engine(model, EngineConfig(max_num_batched_tokens=4), [2]), [req])  # a chunked prefill
    assert tokens(outs) == ref[len(PROMPT) :], name
    assert len(set(ref[len(PROMPT) :])) > 1  # not one token repeated: the check can fail
    with torch.no_grad():
        want = hf(torch.tensor([ref])).logits[0]
    got = model.forward(torch.tensor(ref), [Segment(model.new_cache(len(ref)), 0, len(ref))], torch.arange(len(ref)))
    assert (got - want).abs().max() <= 1e-5 * want.abs().max(), name


def test_scored_continuations_equal_transformers_log_probabilities(family):
    """Classification's scoring request (one packed token tree, masked attention) on the fallback."""
    name, path, hf = family
    continuations = [[40, 41, 2], [40, 99, 2], [7, 2], [40, 41, 2, 9], [200]]
    req, outs = score_request(PROMPT, continuations)
    run_all(
        Engine(TransformersModel.from_dir(path, dtype=torch.float32), EngineConfig(max_num_batched_tokens=8), [2]),
        [req],
    )
    for cont, got in zip(continuations, outs[0].logprobs):
        with torch.no_grad():
            lp = torch.log_softmax(hf(torch.tensor([PROMPT + cont])).logits[0], -1)
        want = [float(lp[len(PROMPT) - 1 + i, t]) for i, t in enumerate(cont)]
        assert got == pytest.approx(want, abs=1e-4), name


def test_peft_adapters_equal_their_merged_models_two_in_one_batch(family, tmp_path):
    from conftest import make_lora
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    name, path, hf = family
    head = hf.get_output_embeddings()  # lm_head, or GPT-NeoX's embed_out
    linears = (m for m in hf.named_modules() if type(m[1]).__name__ in ("Linear", "Conv1D") and m[1] is not head)
    targets = sorted({n.rsplit(".", 1)[-1] for n, _ in linears})
    refs, engine = {}, Engine(TransformersModel.from_dir(path, dtype=torch.float32), EngineConfig(), [2])
    for seed in (1, 2):
        lora = make_lora(path, tmp_path / f"lora{seed}", seed=seed, targets=targets, std=0.3)
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        merged = PeftModel.from_pretrained(base, lora).merge_and_unload().eval()
        refs[f"a{seed}"] = merged.generate(torch.tensor([PROMPT]), max_new_tokens=24, do_sample=False)[0].tolist()
        engine.load_adapter(f"a{seed}", lora)
    plain_ref = hf.generate(torch.tensor([PROMPT]), max_new_tokens=24, do_sample=False)[0].tolist()
    reqs = {a: greedy(PROMPT, 24) for a in (*refs, None)}
    for a, (req, _) in reqs.items():
        req.adapter = a
    run_all(engine, [req for req, _ in reqs.values()])  # the base and both adapters in one batch
    for a, (_, outs) in reqs.items():
        assert tokens(outs) == (refs[a] if a else plain_ref)[len(PROMPT) :], (name, a)
    assert plain_ref != refs["a1"] != refs["a2"] != plain_ref  # each changes the tokens: the check can fail
    engine.remove_adapter("a1")
    engine.remove_adapter("a2")  # the last one: the plain model again
    req, outs = greedy(PROMPT, 24)
    run_all(engine, [req])
    assert tokens(outs) == plain_ref[len(PROMPT) :]


def test_sixteen_requests_together_equal_each_alone_in_bfloat16(family):
    name, path, _ = family
    model = TransformersModel.from_dir(path, dtype=torch.bfloat16)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randrange(1, 40))] for _ in range(16)]
    alone = []
    for p in prompts:
        req, outs = greedy(p, 16)
        run_all(Engine(model, EngineConfig(max_num_batched_tokens=64), [2]), [req])
        alone.append(tokens(outs))
    pairs = [greedy(p, 16) for p in prompts]
    run_all(Engine(model, EngineConfig(max_num_batched_tokens=64), [2]), [r for r, _ in pairs])
    assert [tokens(o) for _, o in pairs] == alone, name


def test_training_scores_packed_examples_as_the_model_itself_does(family):
    """The trainer's packed forward (examples side by side in one row, each attending to itself)
    gives each example the loss transformers' own forward gives it: Gemma's soft-capped attention
    and logits and its sliding window (examples longer than the window) included."""
    from fundament.adapt.examples import IGNORE, Example
    from fundament.adapt.hyperparameters import resolve_hyperparameters
    from fundament.adapt.trainer import Trainer

    name, path, hf = family
    rng = random.Random(1)
    seqs = [[rng.randrange(3, 256) for _ in range(n)] for n in (40, 7, 25)]  # longer and shorter than the window
    row = [Example(s, s[1:] + [IGNORE]) for s in seqs]
    trainer = Trainer(path, resolve_hyperparameters({}, 3), bf16=False)  # fp32 sums
    with torch.no_grad():
        packed, n, _ = trainer.row_loss(row)
        want = sum(
            float(
                torch.nn.functional.cross_entropy(
                    hf(torch.tensor([s])).logits[0, :-1], torch.tensor(s[1:]), reduction="sum"
                )
            )
            for s in seqs
        )
    assert n == sum(len(s) - 1 for s in seqs)
    assert float(packed) == pytest.approx(want, rel=1e-5), name
