"""End to end: LoRA adapters served as their own model ids, mixed with the base model in one
batch, through the official client. In float32 the adapter's greedy answer equals PEFT's merged
model's `generate` on the real SmolLM2 weights."""

from __future__ import annotations

import threading

import openai
import pytest
import torch
from conftest import ServerProcess, make_lora

pytestmark = pytest.mark.slow

MSGS = [{"role": "user", "content": "Name three fruits."}]


@pytest.fixture(scope="module")
def lora_server(server, smollm_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("smol-loras")
    a = make_lora(smollm_dir, d / "a", seed=1, r=8)
    b = make_lora(smollm_dir, d / "b", seed=2, targets=("k_proj", "up_proj"))
    cfg = d / "serve.yaml"
    cfg.write_text(
        "engine: {dtype: float32, kv_cache_dtype: model, int8_activations: false}\n"
        f"adapters:\n  - {{name: smol-a, path: '{a}'}}\n  - {{name: smol-b, path: '{b}', base: gpt-4o-mini}}\n"
    )
    srv = ServerProcess(["--config", str(cfg)], smollm_dir.parents[2])
    srv.adapters = {"smol-a": a, "smol-b": b}
    yield srv
    srv.stop()


def merged_reply(smollm_dir, adapter_dir, n=24):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm_dir)
    base = AutoModelForCausalLM.from_pretrained(smollm_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().eval()
    ids = tok.apply_chat_template(MSGS, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=n, do_sample=False)[0, ids.shape[1] :]
    return tok.decode(out, skip_special_tokens=True)


def test_adapters_listed_and_mixed_batch_matches_peft(lora_server, smollm_dir):
    c = openai.OpenAI(base_url=lora_server.base_url, api_key="x", max_retries=0, timeout=120)
    assert {"smol-a", "smol-b"} <= {m.id for m in c.models.list().data}
    replies, first_logprob = {}, {}

    def ask(model):
        r = c.chat.completions.create(
            model=model, messages=MSGS, temperature=0, max_completion_tokens=24, logprobs=True
        )
        replies[model] = r.choices[0].message.content
        first_logprob[model] = r.choices[0].logprobs.content[0].logprob

    threads = [threading.Thread(target=ask, args=(m,)) for m in ("smollm2-135m-instruct", "smol-a", "smol-b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert replies["smol-a"] == merged_reply(smollm_dir, lora_server.adapters["smol-a"])
    assert replies["smol-b"] == merged_reply(smollm_dir, lora_server.adapters["smol-b"])
    assert len({round(v, 4) for v in first_logprob.values()}) == 3  # each adapter changes the model
