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
    eos_token_id=2,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
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
}


def make_family(path, family: str, seed: int = 0):
    import transformers

    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    cfg = getattr(transformers, config_cls)(**SHAPE, **extra)
    model = getattr(transformers, model_cls)(cfg).eval()
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


def test_float32_equals_transformers_generate_and_its_logits(family):
    name, path, hf = family
    ref = hf.generate(torch.tensor([PROMPT]), max_new_tokens=32, min_new_tokens=32, do_sample=False)[0].tolist()
    model = LlamaModel.from_dir(path, dtype=torch.float32)
    req, outs = greedy(PROMPT, 32)
    run_all(Engine(model, EngineConfig(), [2]), [req])
    assert tokens(outs) == ref[len(PROMPT) :], name
    # logits of every position of the whole sequence, against transformers' forward
    with torch.no_grad():
        want = hf(torch.tensor([ref])).logits[0]
    from fundament.models.llama import Segment

    got = model.forward(torch.tensor(ref), [Segment(model.new_cache(len(ref)), 0, len(ref))], torch.arange(len(ref)))
    assert (got - want).abs().max() <= 1e-4 * want.abs().max(), name


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
