"""Several LoRA adapters in one batch: each row's output equals PEFT's own merged model for its
adapter, and the base rows are untouched."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import DEVICE, make_lora

from fundament.config import EngineConfig
from fundament.engine import Engine, EngineRequest, SamplingParams
from fundament.errors import InvalidRequestError, ModelNotFoundError
from fundament.models.llama import LlamaModel


def merged_greedy(base_dir, adapter_dir, prompt, n):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = base if adapter_dir is None else PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    out = (
        model.to(DEVICE)
        .eval()
        .generate(torch.tensor([prompt], device=DEVICE), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    )
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    return {
        "a": make_lora(tiny_llama, d / "a", seed=1, std=1.0),
        "b": make_lora(tiny_llama, d / "b", seed=2, targets=("k_proj", "up_proj"), r=8, std=1.0),
        "c": make_lora(
            tiny_llama,
            d / "c",
            seed=3,
            targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
            std=1.0,
        ),
    }


def test_mixed_adapter_batch_equals_peft_merged_models(tiny_llama, adapters, native_decode):
    engine = Engine(
        LlamaModel.from_dir(tiny_llama, device=DEVICE, native_decode=native_decode),
        EngineConfig(max_num_batched_tokens=40),
        [2],
    )
    for name, path in adapters.items():
        engine.load_adapter(name, path)
    rng = random.Random(0)
    names = [None, "a", "b", "c"] * 4  # 16 rows, a different adapter on neighbouring rows
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randrange(2, 30))] for _ in names]
    outs = [[] for _ in names]
    reqs = [
        EngineRequest(p, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True), o.append, adapter=a)
        for p, o, a in zip(prompts, outs, names)
    ]
    for r in reqs:
        engine.submit(r)
    while not all(r.finished for r in reqs):
        engine.step()
    for i in (0, 1, 2, 3, 6, 11):
        ref = merged_greedy(tiny_llama, adapters[names[i]] if names[i] else None, prompts[i], 20)
        assert [o.token_id for o in outs[i]] == ref, f"row {i} ({names[i]})"
    # the adapters really change the output: row 1 under its adapter differs from the base model
    assert [o.token_id for o in outs[1]] != merged_greedy(tiny_llama, None, prompts[1], 20)


def test_adapter_changes_output_and_unloads(tiny_llama, adapters, native_decode):
    engine = Engine(LlamaModel.from_dir(tiny_llama, device=DEVICE, native_decode=native_decode), EngineConfig(), [2])
    engine.load_adapter("a", adapters["a"])
    prompt = [5, 6, 7, 8]

    def run(adapter):
        outs = []
        req = EngineRequest(
            prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), outs.append, adapter=adapter
        )
        engine.submit(req)
        while not req.finished:
            engine.step()
        return [o.token_id for o in outs]

    base, with_a = run(None), run("a")
    assert base != with_a
    engine.remove_adapter("a")
    engine.step()
    with pytest.raises(ModelNotFoundError):
        run("a")
    assert run(None) == base
    assert all(not layer["qkv"].lora for layer in engine.model.layers)


def test_bad_adapter_directories_are_refused(tiny_llama, tmp_path):
    model = LlamaModel.from_dir(tiny_llama, device=DEVICE)
    with pytest.raises(InvalidRequestError, match="adapter_config.json"):
        model.add_adapter(0, tmp_path)
    big = make_lora(tiny_llama, tmp_path / "dora", seed=0)
    cfg = (big / "adapter_config.json").read_text().replace('"use_dora": false', '"use_dora": true')
    (big / "adapter_config.json").write_text(cfg)
    with pytest.raises(InvalidRequestError, match="use_dora"):
        model.add_adapter(0, big)
