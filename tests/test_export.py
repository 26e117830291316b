"""Export after a real fine-tuning job on the default model, each format checked by the tool that
would load it: the merged directory in transformers gives the greedy tokens fundament serves for
the ft: model (a float32 server, so both sides compute alike); the GGUF in llama.cpp's
llama-server (F16 against fundament's float32: most prompts alike); the PEFT directory on a base
at another path in PEFT and in vLLM; the Ollama Modelfile; and the GGUF of the base model alone
carries everything the original GGUF had."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
from conftest import REPO, ServerProcess, free_port
from test_fine_tuning import jsonl, wait
from tuning_data import sst2_chat

pytestmark = pytest.mark.slow

BASE = "smollm2-135m-instruct"
LLAMA_SERVER = REPO / ".llama.cpp" / "bin" / "llama-server"
N_TOKENS = 32
PROMPTS = [
    f"Determine the sentiment of this review: '{t}'"
    for t in (
        "a gorgeous, witty, seductive movie",
        "the plot is nothing but boilerplate clichés",
        "an utterly charming and hilarious film",
        "it's a bad sign when you're rooting for the villain",
        "the performances are uniformly excellent",
        "a dull, simple-minded and stereotypical tale",
        "one of the best films of the year",
        "too long, too slow and too silly",
        "warm, funny and deeply felt",
        "a waste of a good cast",
    )
] + [
    "What is the capital of France?",
    "Write a haiku about autumn.",
    "Explain photosynthesis in one sentence.",
    "List three prime numbers.",
    "What is 12 times 12?",
    "Name a famous painter.",
    "Say hello in Spanish.",
    "What colour is the sky on a clear day?",
    "Give me a synonym for happy.",
    "Translate 'thank you' into French.",
]


@pytest.fixture(scope="module")
def tuned(server, tmp_path_factory):
    """A server on float32 weights with a real ft: model of the default model, and its home."""
    home = tmp_path_factory.mktemp("export-home")
    cfg = home / "serve.yaml"
    cfg.write_text(
        "engine: {dtype: float32, kv_cache_dtype: model, int8_activations: false}\n"
    )  # float32 throughout, as transformers
    srv = ServerProcess(["--config", str(cfg)], home)
    c = openai.OpenAI(base_url=srv.base_url, api_key="sk-test", max_retries=0, timeout=120)
    f = c.files.create(file=("train.jsonl", jsonl(sst2_chat(24))), purpose="fine-tune")
    hp = {"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 5}
    job = c.fine_tuning.jobs.create(
        model=BASE, training_file=f.id, seed=3, method={"type": "supervised", "supervised": {"hyperparameters": hp}}
    )
    job = wait(c, job.id, timeout=900)
    assert job.status == "succeeded", job.error
    yield srv, c, home, job.fine_tuned_model
    srv.stop()


def export(home: Path, model: str, fmt: str, out: Path, *extra: str) -> list[Path]:
    env = {**os.environ, "FUNDAMENT_HOME": str(home)}
    r = subprocess.run(
        [sys.executable, "-m", "fundament.cli", "export", model, "--format", fmt, "--out", str(out), *extra],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    return [Path(line) for line in r.stdout.splitlines() if line.startswith("/")]


def prompt_ids(tok, prompt: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    return tok.encode(text, add_special_tokens=False)


def hf_greedy(model, tok, prompt: str) -> list[int]:
    ids = prompt_ids(tok, prompt)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=N_TOKENS, do_sample=False, eos_token_id=tok.eos_token_id
        )
    new = out[0, len(ids) :].tolist()
    return new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new


def served_greedy(c, model: str, tok, prompt: str) -> list[int]:
    r = c.completions.create(model=model, prompt=prompt_ids(tok, prompt), max_tokens=N_TOKENS, temperature=0)
    return tok.encode(r.choices[0].text, add_special_tokens=False)


def test_exports_load_in_transformers_llama_cpp_peft_and_vllm(tuned, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    srv, c, home, ft = tuned
    merged_dir = tmp_path / "merged"
    files = export(home, ft, "merged", merged_dir)
    assert {"config.json", "model.safetensors", "tokenizer.json", "fundament_export.json"} <= {p.name for p in files}
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(merged_dir)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template

    ours = {p: served_greedy(c, ft, tok, p) for p in PROMPTS}
    hf = {p: hf_greedy(merged, tok, p) for p in PROMPTS}
    same = sum(ours[p] == hf[p] for p in PROMPTS)
    base_same = sum(served_greedy(c, BASE, tok, p) == hf[p] for p in PROMPTS[:10])
    print(f"\nmerged in transformers = fundament serving {ft}: {same}/{len(PROMPTS)} prompts, {N_TOKENS} tokens")
    assert same >= 19, [(p, tok.decode(ours[p]), tok.decode(hf[p])) for p in PROMPTS if ours[p] != hf[p]]
    assert base_same < 10  # the merged weights are the fine-tuned model's, not the base's

    # GGUF (F16) in llama.cpp's llama-server, with its Ollama Modelfile
    gguf_dir = tmp_path / "gguf"
    gguf_file, modelfile, _ = export(home, ft, "gguf", gguf_dir)
    text = modelfile.read_text()
    assert text.startswith(f"FROM ./{gguf_file.name}\n") and 'PARAMETER stop "<|im_end|>"' in text
    assert "You are a helpful AI assistant named SmolLM" in text  # the template's default system prompt
    port = free_port()
    log = open(tmp_path / "llama-server.log", "wb")
    llama = subprocess.Popen(
        [str(LLAMA_SERVER), "-m", str(gguf_file), "--port", str(port), "-t", "2", "-c", "2048", "--no-warmup"],
        stdout=log, stderr=log,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert llama.poll() is None, (tmp_path / "llama-server.log").read_text()[-2000:]
            time.sleep(0.5)
        agree = 0
        for p in PROMPTS:
            r = httpx.post(
                f"http://127.0.0.1:{port}/completion",
                json={"prompt": prompt_ids(tok, p), "n_predict": N_TOKENS, "temperature": 0, "top_k": 1, "return_tokens": True},
                timeout=120,
            ).json()  # fmt: skip
            got = [t for t in r["tokens"] if t != tok.eos_token_id]
            agree += got == hf[p]
        print(f"GGUF F16 in llama.cpp = merged float32 in transformers: {agree}/{len(PROMPTS)} prompts")
        assert agree >= 14  # F16 weights and llama.cpp's kernels round apart from float32 on a few prompts
    finally:
        llama.terminate()
        llama.wait(30)

    # PEFT: the adapter on a base model at another path
    peft_dir = tmp_path / "peft"
    export(home, ft, "peft", peft_dir)
    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    provenance = json.loads((peft_dir / "fundament_export.json").read_text())
    elsewhere = tmp_path / "another-machine" / "SmolLM2-135M-Instruct"
    shutil.copytree(provenance["base_model_local_dir"], elsewhere)
    from peft import PeftModel

    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(elsewhere, dtype=torch.float32), peft_dir
    ).eval()
    for p in PROMPTS[:5]:
        assert hf_greedy(adapted, tok, p) == hf[p]

    # and vLLM serves the same adapter (its environment: make vllm-env)
    from fundament.config import VLLMSpec
    from fundament.engine.vllm_server import VLLMServer

    spec = VLLMSpec(dtype="float32", args=["--lora-modules", f"exported={peft_dir}"])
    vllm = VLLMServer(BASE, elsewhere, spec)
    vllm.start()
    try:
        deadline = time.time() + 900
        while vllm.state != "ready" and time.time() < deadline:
            time.sleep(1)
        assert vllm.state == "ready", vllm.log_tail()
        agree = 0
        for p in PROMPTS[:10]:
            r = httpx.post(
                f"{vllm.url}/v1/completions",
                json={"model": "exported", "prompt": prompt_ids(tok, p), "max_tokens": N_TOKENS, "temperature": 0,
                      "return_token_ids": True, "skip_special_tokens": False},
                timeout=300,
            ).json()  # fmt: skip
            got = [t for t in r["choices"][0]["token_ids"] if t != tok.eos_token_id]
            agree += got == hf[p]
        print(f"PEFT export in vLLM (float32) = merged in transformers: {agree}/10 prompts")
        assert agree >= 8
    finally:
        vllm.stop()


def test_the_base_model_exports_as_a_gguf_with_everything_its_gguf_had(tmp_path):
    import gguf

    from fundament.config import DEFAULT_MODELS
    from fundament.models.loading import resolve_path

    out = tmp_path / "base"
    written = export(tmp_path / "home", BASE, "gguf", out, "--quantization", "q8_0")
    source = gguf.GGUFReader(str(resolve_path(DEFAULT_MODELS[0])))
    ours = gguf.GGUFReader(str(written[0]))
    for key, field in source.fields.items():  # tokenizer, merges, special tokens, chat template, rope...
        if key not in ("general.file_type", "GGUF.kv_count", "GGUF.tensor_count"):
            assert ours.fields[key].contents() == field.contents(), key
    assert ours.fields["general.file_type"].contents() == 7  # Q8_0
    theirs = {t.name: t for t in source.tensors}
    assert [t.name for t in ours.tensors] == list(theirs)
    for t in ours.tensors:
        a = gguf.quants.dequantize(theirs[t.name].data, theirs[t.name].tensor_type)
        b = gguf.quants.dequantize(t.data, t.tensor_type)
        # Q4_1 -> float32 -> Q8_0: within half a Q8_0 step of each block's largest weight
        assert a.shape == b.shape and np.abs(a - b).max() <= np.abs(a).max() / 127 + 1e-6, t.name
    with pytest.raises(AssertionError, match="has no adapter"):
        export(tmp_path / "home", BASE, "peft", tmp_path / "nope")
