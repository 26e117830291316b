"""The config file: every section's known keys and types, each mistake named by file, key path and
what is wrong, in one line the CLI prints; a config the server writes for its worker reads back."""

from __future__ import annotations

import pytest

from fundament.cli import main
from fundament.config import DEFAULT_MODELS, ModelSpec, ServeConfig
from fundament.errors import ConfigError, InvalidRequestError


def write(tmp_path, text: str):
    path = tmp_path / "fundament.yaml"
    path.write_text(text)
    return path


def test_engine_settings_load_with_their_types(tmp_path):
    cfg = ServeConfig.from_yaml(
        write(tmp_path, "engine:\n  native_decode: no\n  threads: null\n  max_num_seqs: 8\n  dtype: float32\n")
    )
    assert (cfg.engine.native_decode, cfg.engine.threads, cfg.engine.max_num_seqs, cfg.engine.dtype) == (
        False,
        None,
        8,
        "float32",
    )
    assert cfg.engine.int8_decode is True and cfg.engine.batch_invariant is True  # left out: their defaults
    assert cfg.engine.kv_cache_dtype == "auto"


def test_the_kv_cache_is_bf16_under_a_float32_model_unless_told_otherwise(tiny_llama):
    import torch

    from fundament.config import EngineConfig
    from fundament.registry import load_weights

    def cache_dtype(**kw):
        return load_weights("tiny", tiny_llama, EngineConfig(**kw)).new_cache(8).dtype

    assert cache_dtype(dtype="float32") == torch.bfloat16  # the default: half the memory
    assert cache_dtype(dtype="float32", kv_cache_dtype="model") == torch.float32
    assert cache_dtype(dtype="bfloat16") == torch.bfloat16


def test_models_and_keys_load_with_their_defaults(tmp_path):
    cfg = ServeConfig.from_yaml(
        write(
            tmp_path, "port: 9001\napi_keys: sk-1\nmodels:\n  - {name: m, path: /m.gguf, sampling: {temperature: 0}}\n"
        )
    )
    assert cfg.port == 9001 and cfg.api_keys == ["sk-1"]  # one key may be written without a list
    (m,) = cfg.models
    assert (m.name, m.task, m.path, m.package, m.sampling.temperature, m.sampling.top_p) == (
        "m",
        "generate",
        "/m.gguf",
        None,
        0.0,
        1.0,
    )
    assert isinstance(m, ModelSpec) and cfg.aliases["gpt-4o-mini"] == "smollm2-135m-instruct"
    assert ServeConfig.from_yaml(write(tmp_path, "")).models == DEFAULT_MODELS


@pytest.mark.parametrize(
    "text, param, words",
    [
        (
            'engine:\n  native_decode: "no"\n',
            "engine.native_decode",
            "engine.native_decode: must be true or false, got 'no'",
        ),
        ("engine:\n  max_num_seqs: 8.5\n", "engine.max_num_seqs", "engine.max_num_seqs: must be an integer, got 8.5"),
        ("engine:\n  max_num_seqs: true\n", "engine.max_num_seqs", "engine.max_num_seqs: must be an integer, got true"),
        ("engine:\n  threads: two\n", "engine.threads", "engine.threads: must be an integer or null, got 'two'"),
        (
            "engine:\n  prefix_cache_tokens: -1\n",
            "engine.prefix_cache_tokens",
            "engine.prefix_cache_tokens: must be greater than or equal to 0, got -1",
        ),
        ("engine:\n  native: true\n", "engine.native", "engine.native: unknown key (did you mean 'native_decode'?)"),
        ("engine: fast\n", "engine", "engine: must be a mapping of settings, got 'fast'"),
        (
            "models:\n  - {name: m, pth: /m.gguf}\n",
            "models[0].pth",
            "models[0].pth: unknown key (did you mean 'path'?)",
        ),
        (
            "models:\n  - {name: m}\n  - {name: n, sampling: {top_p: high}}\n",
            "models[1].sampling.top_p",
            "models[1].sampling.top_p: must be a number, got 'high'",
        ),
        (
            "models:\n  - {name: m, sampling: greedy}\n",
            "models[0].sampling",
            "models[0].sampling: must be a mapping of settings, got 'greedy'",
        ),
        ("models:\n  - {path: /m.gguf}\n", "models[0].name", "models[0].name: required, but missing"),
        (
            "models:\n  - {name: m, task: chat}\n",
            "models[0].task",
            "models[0].task: must be 'generate' or 'embed', got 'chat'",
        ),
        (
            "engine: {kv_cache_dtype: float8}\n",
            "engine.kv_cache_dtype",
            "engine.kv_cache_dtype: must be 'auto' or 'model', got 'float8'",
        ),
        ("models: smollm\n", "models", "models: must be a list, got 'smollm'"),
        ("port: abc\n", "port", "port: must be an integer, got 'abc'"),
        ('port: "8000"\n', "port", "port: must be an integer, got '8000'"),
        ("port: 80000\n", "port", "port: must be less than or equal to 65535, got 80000"),
        ("aliases: {mini: 3}\n", "aliases.mini", "aliases.mini: must be a string, got 3"),
        (
            "adapters:\n  - {name: a, path: /a, bsae: m}\n",
            "adapters[0].bsae",
            "adapters[0].bsae: unknown key (did you mean 'base'?)",
        ),
        ("modles: []\n", "modles", "modles: unknown key (did you mean 'models'?)"),
        ("zzz: 1\n", "zzz", "zzz: unknown key; known: host, port, api_keys,"),
    ],
)
def test_a_wrong_setting_is_named_with_its_file_and_key_path(tmp_path, text, param, words):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        ServeConfig.from_yaml(path)
    assert e.value.param == param and e.value.message.startswith(f"config file {path}: {words}")
    assert not isinstance(e.value, InvalidRequestError)  # no request was made: not an HTTP 400


def test_every_wrong_key_is_named_at_once(tmp_path):
    with pytest.raises(ConfigError) as e:
        ServeConfig.from_yaml(write(tmp_path, "port: abc\nengine: {dtype: 16}\n"))
    assert "port: must be an integer, got 'abc'; engine.dtype: must be a string, got 16" in e.value.message


@pytest.mark.parametrize(
    "text, words", [("- port: 1\n", "must hold a mapping at the top level"), ("port: [\n", "cannot read config file")]
)
def test_a_file_that_is_not_a_mapping_is_refused(tmp_path, text, words):
    with pytest.raises(ConfigError, match=words):
        ServeConfig.from_yaml(write(tmp_path, text))


def test_the_cli_prints_a_config_error_as_one_line(tmp_path, capsys):
    path = write(tmp_path, "models:\n  - {name: m, pth: /m.gguf}\n")
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == f"fundament: config file {path}: models[0].pth: unknown key (did you mean 'path'?)\n"


def test_the_config_written_for_the_worker_reads_back_equal(tmp_path):
    from fundament.jobs.supervisor import write_config

    cfg = ServeConfig.from_yaml(
        write(
            tmp_path,
            "api_keys: [sk-1]\nengine: {threads: 2, batch_invariant: false}\nadapters: [{name: a, path: /a}]\n",
        )
    )
    back = ServeConfig.from_yaml(write_config(cfg, tmp_path / "worker.yaml"))
    assert back.api_keys == [] and back.engine.threads == 2 and back.engine.batch_invariant is False
    assert (back.models, back.aliases, back.adapters) == (cfg.models, cfg.aliases, cfg.adapters)


def test_a_model_entry_without_weights_is_a_config_error(tmp_path):
    from fundament.models.loading import resolve_path

    with pytest.raises(ConfigError, match=r"model 'm': .*nowhere.gguf does not exist"):
        resolve_path(ModelSpec(name="m", path=str(tmp_path / "nowhere.gguf")))
    with pytest.raises(ConfigError, match="neither a path nor a package"):
        resolve_path(ModelSpec(name="m"))
