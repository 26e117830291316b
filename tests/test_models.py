"""The model registry and loading by path: GGUF files, Hugging Face directories, config files,
aliases, API keys, and the dequantized-GGUF cache that makes later starts fast."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
from conftest import ServerProcess, make_tiny_llama

from fundament.config import DEFAULT_MODELS, ServeConfig
from fundament.errors import ConfigError, ModelNotFoundError
from fundament.models.loading import hf_dir_for, resolve_path
from fundament.registry import ModelRegistry, spec_from_path


def test_models_list_has_defaults_and_aliases(client):
    ids = {m.id for m in client.models.list().data}
    assert {"smollm2-135m-instruct", "all-minilm-l6-v2", "gpt-4o-mini", "text-embedding-3-small"} <= ids
    m = client.models.retrieve("gpt-4o-mini")
    assert m.id == "gpt-4o-mini" and m.object == "model" and m.owned_by == "fundament"


def test_default_entries_resolve_to_the_wheels():
    gguf = resolve_path(DEFAULT_MODELS[0])
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf.stat().st_size > 50_000_000
    assert (resolve_path(DEFAULT_MODELS[1]) / "modules.json").exists()


def test_gguf_is_dequantized_once_and_reused(server, smollm_dir):
    stamp = (smollm_dir / "model.safetensors").stat().st_mtime_ns
    t = time.perf_counter()
    assert hf_dir_for(DEFAULT_MODELS[0]) == smollm_dir
    assert time.perf_counter() - t < 1.0  # a cache hit reads nothing from the GGUF
    assert (smollm_dir / "model.safetensors").stat().st_mtime_ns == stamp
    assert not list(smollm_dir.parent.glob(".tmp-*"))


def test_registry_resolves_aliases_and_refuses_unknown_names():
    reg = ModelRegistry(ServeConfig(models=[]))
    with pytest.raises(ModelNotFoundError):
        reg.resolve_generator("gpt-4o-mini")  # aliases only point at loaded models


def test_spec_from_path_names_models_by_file(tmp_path):
    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / "modules.json").write_text("[]")
    assert spec_from_path(str(tmp_path / "enc")).task == "embed"
    s = spec_from_path(str(tmp_path / "My-Model.Q8_0.gguf"))
    assert s.name == "my-model.q8_0" and s.task == "generate"


def test_config_file_rejects_unknown_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("port: 9000\nmodles: []\n")
    with pytest.raises(ConfigError, match="modles"):
        ServeConfig.from_yaml(p)
    p.write_text("port: 9001\naliases: {mini: smollm2-135m-instruct}\nengine: {max_num_seqs: 8}\n")
    cfg = ServeConfig.from_yaml(p)
    assert cfg.port == 9001 and cfg.engine.max_num_seqs == 8 and cfg.aliases == {"mini": "smollm2-135m-instruct"}


@pytest.fixture(scope="module")
def by_path_server(server, smollm_dir, tmp_path_factory):
    """A second server with API keys, serving a tiny HF directory and the GGUF file by path from a
    config file, with a home of its own and the session's cache (a second start of the GGUF)."""
    tiny = make_tiny_llama(tmp_path_factory.mktemp("tiny-chat") / "tiny-chat", vocab_size=49152)
    for f in [*smollm_dir.glob("tokenizer*"), smollm_dir / "chat_template.jinja"]:
        shutil.copy(f, tiny / f.name)
    gguf = resolve_path(DEFAULT_MODELS[0])
    cfg = tiny.parent / "serve.yaml"
    cfg.write_text(
        "models:\n"
        f"  - {{name: tiny-chat, path: '{tiny}', sampling: {{temperature: 0.0, max_completion_tokens: 7}}}}\n"
        f"  - {{name: smol-by-path, path: '{gguf}'}}\n"
        "aliases: {gpt-4o-mini: smol-by-path}\n"
        "engine: {max_num_seqs: 1, max_queue: 1}\n"
    )
    srv = ServerProcess(["--config", str(cfg), "--api-key", "sk-right"], tmp_path_factory.mktemp("by-path-home"))
    yield srv
    srv.stop()


def test_models_load_by_path_from_a_config_file(by_path_server):
    c = openai.OpenAI(base_url=by_path_server.base_url, api_key="sk-right", max_retries=0)
    assert {m.id for m in c.models.list().data} == {"tiny-chat", "smol-by-path", "gpt-4o-mini"}
    r = c.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "hi"}])
    assert r.usage.completion_tokens == 7 and r.choices[0].finish_reason == "length"  # the entry's default
    r = c.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "What is 2+2?"}],
        max_completion_tokens=20,
        temperature=0,
    )
    assert "4" in r.choices[0].message.content


def test_one_cache_serves_every_home_and_two_loaders_at_once_build_it_once(tmp_path):
    """$FUNDAMENT_CACHE: processes with homes of their own (two servers, a test, a benchmark) share
    one dequantized copy of a GGUF. Two that start at once on an empty cache both build it; the
    second to finish finds the first's in place and drops its own, so both load the one directory
    and nothing half-written or duplicated is left behind."""
    cache = tmp_path / "shared-cache"
    code = "from fundament.config import DEFAULT_MODELS\nfrom fundament.models.loading import hf_dir_for\nprint(hf_dir_for(DEFAULT_MODELS[0]))"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env={**os.environ, "FUNDAMENT_CACHE": str(cache), "FUNDAMENT_HOME": str(tmp_path / f"home{i}")},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    dirs = {Path(out.strip().splitlines()[-1]) for out, _ in outs}
    built = list((cache / "gguf").iterdir())
    assert len(dirs) == 1 and built == list(dirs), (dirs, built)  # no .tmp-* left, no second copy
    assert (built[0] / "config.json").exists() and (built[0] / "model.safetensors").stat().st_size > 100_000_000
    assert not any((tmp_path / f"home{i}" / "cache").exists() for i in range(2))


def test_api_keys_when_configured(by_path_server):
    for key in ("sk-wrong", ""):
        c = openai.OpenAI(
            base_url=by_path_server.base_url,
            api_key=key or "x",
            max_retries=0,
            default_headers={"Authorization": ""} if not key else None,
        )
        with pytest.raises(openai.AuthenticationError) as ei:
            c.models.list()
        assert ei.value.status_code == 401 and ei.value.code == "invalid_api_key"


def test_any_key_is_accepted_when_none_is_configured(server):
    c = openai.OpenAI(base_url=server.base_url, api_key="whatever-i-like", max_retries=0)
    assert c.models.list().data


def test_full_queue_is_429_with_retry_after(by_path_server):
    import asyncio

    import httpx

    async def burst():
        async with httpx.AsyncClient(timeout=60, headers={"authorization": "Bearer sk-right"}) as c:
            body = {
                "model": "tiny-chat",
                "messages": [{"role": "user", "content": "hi"}],
                "max_completion_tokens": 400,
                "ignore_eos": True,
            }
            return await asyncio.gather(
                *(c.post(f"{by_path_server.base_url}/chat/completions", json=body) for _ in range(6))
            )

    responses = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    # one runs (and perhaps one waits); the rest are turned away, none fails any other way
    assert codes.count(200) >= 1 and codes.count(429) >= 4 and set(codes) == {200, 429}
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    c = openai.OpenAI(base_url=by_path_server.base_url, api_key="sk-right", max_retries=3)
    assert c.chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "hi"}]
    ).choices  # the client's retries get through


def test_an_adapter_on_a_model_not_served_is_a_config_error():
    """A --lora/adapters entry is the server's configuration: its mistake is not a request's 400."""
    from fundament.config import ServeConfig
    from fundament.errors import ConfigError, InvalidRequestError

    with pytest.raises(ConfigError, match="base model 'nope' is not served here") as e:
        ModelRegistry(ServeConfig(models=[])).add_adapter("mine", "/no/such/dir", "nope")
    assert not isinstance(e.value, InvalidRequestError) and e.value.param == "adapters.base"
