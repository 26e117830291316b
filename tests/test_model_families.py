"""The model families the engine takes, each a tiny random model made from its own transformers
config class: in float32 the engine's greedy tokens equal transformers' `generate` for 32 steps
and its logits agree within 1e-4; on the default CPU path (bf16, low-bit weights, the native
kernel) 16 requests together equal each alone. Architectures and rotary scalings it does not
take are refused with a 400 that names what it does take."""

from __future__ import annotations

import random

import pytest
import torch
from test_engine import greedy, run_all, tokens

from fundament.config import EngineConfig
from fundament.engine import Engine
from fundament.errors import InvalidRequestError
from fundament.models.llama import LlamaModel

SHAPE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=None,  # no end token: `generate` then runs all 32 steps unconstrained, as the engine with ignore_eos
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def longrope(rotary_dims: int, partial: float = 1.0, original: int = 16) -> dict:
    half = rotary_dims // 2
    return {
        "original_max_position_embeddings": original,
        "partial_rotary_factor": partial,
        "rope_parameters": {
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "original_max_position_embeddings": original,
            "partial_rotary_factor": partial,
            "short_factor": [1.0 + 0.05 * i for i in range(half)],
            "long_factor": [1.0 + 2.0 * i for i in range(half)],
        },
    }


FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama-3.x": ("LlamaConfig", "LlamaForCausalLM", {"rope_parameters": LLAMA3_ROPE}),
    "llama-linear-rope": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}},
    ),
    "llama-yarn-rope": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 32,
            }
        },
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),
    # Phi-3's LongRoPE (128k models): a short set of frequency factors up to original_max_position_embeddings
    # (16 here, so 32 generated tokens cross it), the long set past it; Phi-4-mini's also over only
    # part of each head (0.75 of 16: 12 dims, 6 factors)
    "phi3-longrope": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0, **longrope(16)}),
    "phi4-mini": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0, **longrope(12, partial=0.75)}),
    "phi3-partial-rotary": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0, "partial_rotary_factor": 0.5}),
    # windows shorter than the test's sequences, so the sliding layers really slide
    # and soft-capping at values these small random weights reach (Gemma 2's own, 50 and 30, they do not)
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {
            "head_dim": 16,
            "sliding_window": 16,
            "pad_token_id": 0,
            "attn_logit_softcapping": 0.1,
            "final_logit_softcapping": 2.0,
        },
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {
            "head_dim": 16,
            "sliding_window": 16,
            "pad_token_id": 0,
            "layer_types": ["sliding_attention", "full_attention"],
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
            },
        },
    ),
}
LONGROPE = ("phi3-longrope", "phi4-mini")
PHI = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # Phi-3 stores them fused
LORA_TARGETS = {name: PHI for name in ("phi3", "phi3-longrope", "phi4-mini", "phi3-partial-rotary")}
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_family(path, family: str, seed: int = 0, **overrides):
    config_cls, model_cls, extra = FAMILIES[family]
    return make_random(path, config_cls, model_cls, {**SHAPE, **extra, **overrides}, seed)


def make_random(path, config_cls: str, model_cls: str, config: dict, seed: int = 0):
    """A random model of transformers' `model_cls` from `config_cls(**config)`, saved at path."""
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config)).eval()
    with torch.no_grad():  # larger than the default init, so the tokens depend on every weight
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return request.param, path, make_family(path, request.param)


PROMPT = [5, 17, 99, 3, 250, 41, 7, 64, 12]


def prompt_for(name: str) -> list[int]:
    """LongRoPE: a prompt past the original context, where transformers takes the long set from the
    start, as the engine does for every sequence of a model whose context is longer."""
    return PROMPT + PROMPT[::-1] if name in LONGROPE else PROMPT


def test_float32_equals_transformers_generate_and_its_logits(family):
    name, path, hf = family
    prompt = prompt_for(name)
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[0].tolist()
    model = LlamaModel.from_dir(path, dtype=torch.float32)
    req, outs = greedy(prompt, 32)
    run_all(Engine(model, EngineConfig(), [2]), [req])
    assert tokens(outs) == ref[len(prompt) :], name
    # logits of every position of the whole sequence, against transformers' forward
    with torch.no_grad():
        want = hf(torch.tensor([ref])).logits[0]
    from fundament.models.llama import Segment

    got = model.forward(torch.tensor(ref), [Segment(model.new_cache(len(ref)), 0, len(ref))], torch.arange(len(ref)))
    assert (got - want).abs().max() <= 1e-4 * want.abs().max(), name
    # and one token at a time after the prompt: decode rows, the native kernel's where it builds
    n, cache = len(prompt), model.new_cache(len(ref))
    model.forward(torch.tensor(prompt), [Segment(cache, 0, n)], torch.tensor([n - 1]))
    steps = [
        model.forward(torch.tensor([t]), [Segment(cache, i, 1)], torch.tensor([0]))[0] for i, t in enumerate(ref[n:], n)
    ]
    assert (torch.stack(steps) - want[n:]).abs().max() <= 1e-4 * want.abs().max(), name


def test_a_lora_adapter_equals_pefts_merged_model(family, tmp_path):
    from conftest import make_lora
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    name, path, _ = family
    lora = make_lora(path, tmp_path / "lora", targets=LORA_TARGETS.get(name, ALL_PROJECTIONS), std=0.1)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, lora).merge_and_unload().eval()
    prompt = prompt_for(name)
    ref = merged.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[0].tolist()
    model = LlamaModel.from_dir(path, dtype=torch.float32)
    engine = Engine(model, EngineConfig(), [2])
    engine.load_adapter("a", lora)
    req, outs = greedy(prompt, 32)
    req.adapter = "a"
    run_all(engine, [req])
    assert tokens(outs) == ref[len(prompt) :], name
    plain, plain_outs = greedy(prompt, 32)
    run_all(engine, [plain])
    assert tokens(plain_outs) != tokens(outs)  # the adapter changes the tokens: the check can fail


def test_sixteen_requests_together_equal_each_alone_on_the_default_path(family):
    name, path, _ = family
    model = LlamaModel.from_dir(path, dtype=torch.bfloat16)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randrange(1, 40))] for _ in range(16)]
    alone = []
    for p in prompts:
        req, outs = greedy(p, 16)
        run_all(Engine(model, EngineConfig(), [2]), [req])
        alone.append(tokens(outs))
    pairs = [greedy(p, 16) for p in prompts]
    run_all(Engine(model, EngineConfig(max_num_batched_tokens=64), [2]), [r for r, _ in pairs])
    assert [tokens(o) for _, o in pairs] == alone, name


def test_llama3_scaling_is_applied():
    """The llama3 rope changes the low frequencies (what the family test above checks against
    transformers); a model read without it would drift from the reference at long positions."""
    from fundament.models.llama.config import LlamaConfig

    base = dict(SHAPE, architectures=["LlamaForCausalLM"], model_type="llama", rope_theta=500000.0)
    plain, _ = LlamaConfig.from_hf(base).rope_frequencies()
    scaled, factor = LlamaConfig.from_hf(dict(base, rope_parameters=LLAMA3_ROPE)).rope_frequencies()
    # the highest frequency kept, the lowest divided by the factor (8)
    assert factor == 1.0 and scaled[0] == plain[0] and torch.allclose(scaled[-2:], plain[-2:] / 8)


def test_longrope_takes_the_short_set_within_the_original_context(tmp_path):
    """A LongRoPE model whose context is its original one (Phi-3-mini-4k's form) keeps the short
    factors, as transformers does for sequences that short; the family above takes the long."""
    hf = make_family(tmp_path, "phi4-mini", **longrope(12, partial=0.75, original=256))
    ref = hf.generate(torch.tensor([PROMPT]), max_new_tokens=32, do_sample=False)[0].tolist()
    model = LlamaModel.from_dir(tmp_path, dtype=torch.float32)
    assert not model.cfg.long_rope
    short = model.cfg.rope_frequencies()[0]
    req, outs = greedy(PROMPT, 32)
    run_all(Engine(model, EngineConfig(), [2]), [req])
    assert tokens(outs) == ref[len(PROMPT) :]
    model.cfg.max_position_embeddings = 1024  # a longer context: the long set, other frequencies
    assert model.cfg.long_rope and not torch.equal(model.cfg.rope_frequencies()[0], short)


def test_a_sliding_window_caps_the_context():
    """Up to the window, sliding-window attention is full attention: the context stops there."""
    from fundament.models.llama.config import LlamaConfig

    mistral = {**SHAPE, "architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": 64}
    assert LlamaConfig.from_hf(mistral).max_position_embeddings == 64
    qwen = {**SHAPE, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "sliding_window": 64}
    assert LlamaConfig.from_hf(qwen).max_position_embeddings == 256  # use_sliding_window is off by default
    assert LlamaConfig.from_hf({**qwen, "use_sliding_window": True}).max_position_embeddings == 64


@pytest.mark.parametrize(
    "change, message",
    [
        ({"architectures": ["GPTNeoXForCausalLM"]}, "architecture GPTNeoXForCausalLM is not supported"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "rope type dynamic is not supported"),
    ],
)
def test_what_the_engine_does_not_take_is_refused_by_name(change, message):
    from fundament.models.llama.config import LlamaConfig

    with pytest.raises(InvalidRequestError, match=message):
        LlamaConfig.from_hf({**SHAPE, "architectures": ["LlamaForCausalLM"], "model_type": "llama", **change})


@pytest.mark.slow
def test_end_of_turn_tokens_come_from_the_generation_config(smollm_dir, tmp_path):
    import json
    import shutil

    from fundament.models.tokenizer import ChatTokenizer

    for f in smollm_dir.iterdir():
        if f.suffix != ".safetensors":  # the tokenizer, its chat template and the config
            shutil.copy(f, tmp_path / f.name)
    plain = ChatTokenizer(tmp_path)
    im_end = plain.hf.convert_tokens_to_ids("<|im_end|>")
    assert im_end in plain.eos_token_ids  # no generation config: the chat format's end of turn
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    assert ChatTokenizer(tmp_path).eos_token_ids == sorted({plain.hf.eos_token_id, 7, 9})
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 11}))
    assert ChatTokenizer(tmp_path).eos_token_ids == sorted({plain.hf.eos_token_id, 11})


def test_fine_tuning_targets_name_the_modules_the_model_has(family):
    """A job's LoRA targets are the Llama names; where the model stores them fused (Phi-3), PEFT is
    given the fused module's name, so its adapters load back into the engine (test above)."""
    from fundament.adapt.hyperparameters import ALL_LINEAR
    from fundament.adapt.trainer import stored_targets

    name, _, hf = family
    want = LORA_TARGETS.get(name, ALL_PROJECTIONS)
    assert stored_targets(hf, ALL_LINEAR) == sorted(want)
    assert stored_targets(hf, ["q_proj"]) == (["qkv_proj"] if name.startswith("phi") else ["q_proj"])
