"""The vLLM backend's parts that need no vLLM: fundament's grammars as vLLM's structured_outputs
(and what vLLM's guidance backend makes of them), vLLM's errors as fundament's, the vllm: config
section and --vllm flags, and a backend that cannot be reached (a 503 at once, never a hang).
tests/test_vllm.py runs the real vLLM."""

from __future__ import annotations

import asyncio
import json
import time

import llguidance
import pytest
from conftest import free_port

from fundament.config import EngineConfig, ServeConfig, VLLMSpec
from fundament.engine.constraints import choice_grammar, json_schema_grammar, regex_grammar
from fundament.engine.sampling import SamplingParams
from fundament.engine.vllm import VLLMEngine
from fundament.engine.vllm_wire import backend_error, structured_outputs
from fundament.errors import (
    ConfigError,
    ContextLengthExceededError,
    InvalidRequestError,
    NotFoundError,
    QueueFullError,
    ServiceUnavailableError,
)


def test_grammars_become_structured_outputs_that_compile_to_the_same_grammar():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    so = structured_outputs(json_schema_grammar(schema, "response_format"))
    assert set(so) == {"json"} and so["json"]["properties"] == schema["properties"]
    # vLLM's guidance backend compiles `json` with whitespace_flexible by default; the schema's own
    # x-guidance keeps fundament's setting, so both engines enforce one grammar.
    assert so["json"]["x-guidance"]["whitespace_flexible"] is False
    again = llguidance.LLMatcher.grammar_from_json_schema(so["json"], defaults={"whitespace_flexible": True})
    assert again == json_schema_grammar(schema, "response_format")
    lenient = structured_outputs(json_schema_grammar({"type": "object", "minProperties": 1}, "x", lenient=True))
    assert lenient["json"]["x-guidance"]["lenient"] is True
    assert structured_outputs(regex_grammar("[0-9]+", "guided_regex")) == {"grammar": "start: /[0-9]+/"}
    choice = structured_outputs(choice_grammar(["yes", "no"], "guided_choice"))
    assert choice == {"grammar": 'start: "yes" | "no"'}
    for so in (structured_outputs(regex_grammar("[0-9]+", "x")), choice):
        assert llguidance.LLMatcher.validate_grammar(llguidance.grammar_from("grammar", so["grammar"])) == ""


@pytest.mark.parametrize(
    "status,body,kind,text",
    [
        (
            400,
            {"error": {"message": "bad top_k", "param": "top_k"}},
            InvalidRequestError,
            "vLLM refused the request: bad top_k",
        ),
        (400, {"message": "This model's maximum context length is 2048 tokens"}, ContextLengthExceededError, "2048"),
        (404, {"error": {"message": "The model `x` does not exist."}}, NotFoundError, "does not exist"),
        (429, {"error": {"message": "too many"}}, QueueFullError, "busy"),
        (500, {"error": {"message": "EngineCore encountered an issue"}}, ServiceUnavailableError, "EngineCore"),
        (502, "<html>bad gateway</html>", ServiceUnavailableError, "bad gateway"),
    ],
)
def test_vllm_errors_become_fundaments(status, body, kind, text):
    e = backend_error(status, body, "m")
    assert type(e) is kind and text in e.message
    if status == 400 and isinstance(body, dict) and "error" in body:
        assert e.param == "top_k"


def test_the_vllm_section_is_checked_like_the_rest_of_the_config(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("models:\n  - {name: m, path: /x, vllm: {url: 'http://gpu:8000', request_timeout_s: 30}}\n")
    spec = ServeConfig.from_yaml(good).models[0].vllm
    assert (
        spec is not None
        and spec.url == "http://gpu:8000"
        and spec.request_timeout_s == 30.0
        and spec.max_lora_rank == 16
    )
    for text, where, what in [
        ("vllm: {urll: x}", "models[0].vllm.urll", "did you mean 'url'"),
        ("vllm: {max_lora_rank: 48}", "models[0].vllm.max_lora_rank", "512"),
        ("vllm: {port: '8000'}", "models[0].vllm.port", "an integer"),
    ]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(f"models:\n  - {{name: m, path: /x, {text}}}\n")
        with pytest.raises(ConfigError) as e:
            ServeConfig.from_yaml(bad)
        assert e.value.param == where and what in e.value.message


def test_serve_flags_merge_into_the_config(tmp_path):
    from fundament.cli import _vllm_flags, build_parser

    cfg = ServeConfig()
    cfg.models[0].vllm = VLLMSpec(max_lora_rank=128, dtype="float32")
    args = build_parser().parse_args(
        ["serve", "--vllm", "--vllm-arg=--enforce-eager", "--vllm-python", "/opt/v/python"]
    )
    _vllm_flags(cfg, args)
    spec = cfg.models[0].vllm
    assert (spec.max_lora_rank, spec.dtype, spec.python, spec.args) == (
        128,
        "float32",
        "/opt/v/python",
        ["--enforce-eager"],
    )
    assert cfg.models[1].vllm is None  # the embedding model stays on fundament
    two = ServeConfig()
    two.models.append(two.models[0].__class__(name="other", path="/x"))
    with pytest.raises(Exception, match="one server"):
        _vllm_flags(two, build_parser().parse_args(["serve", "--vllm-url", "http://gpu:8000"]))


def test_a_vllm_that_cannot_be_reached_is_a_503_at_once(tmp_path):
    port = free_port()  # nothing listens there
    engine = VLLMEngine(
        "m", VLLMSpec(url=f"http://127.0.0.1:{port}/v1", served_model_name="m"), EngineConfig(), [2], 2048, tmp_path
    )
    assert engine.url == f"http://127.0.0.1:{port}" and engine.health()["backend"] == "vllm"

    async def generate():
        return [o async for o in engine.generate([1, 2, 3], SamplingParams(max_tokens=4))]

    t = time.perf_counter()
    for call in (generate, lambda: engine.score([1, 2], [[3], [4, 5]])):
        with pytest.raises(ServiceUnavailableError) as e:
            asyncio.run(call())
        assert "'m'" in e.value.message and "vLLM" in e.value.message and "not reachable" in e.value.message
    assert time.perf_counter() - t < 10
    # an adapter recorded while vLLM is away is kept, to be registered when it answers
    engine.load_adapter("ft:m:x", tmp_path)
    assert engine.adapters == {"ft:m:x": str(tmp_path.resolve())} and engine.health()["adapters"] == []
    with pytest.raises(ContextLengthExceededError):
        engine.check_fits(2000, 100)


def test_a_supervised_vllm_without_its_environment_is_a_config_error(tmp_path, monkeypatch):
    from fundament.engine import vllm_server

    monkeypatch.delenv("FUNDAMENT_VLLM_PYTHON", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(vllm_server, "__file__", str(tmp_path / "a" / "b" / "c" / "d.py"))
    with pytest.raises(ConfigError, match="make vllm-env"):
        vllm_server.vllm_python(VLLMSpec(python=str(tmp_path / "nope")))


def test_the_supervised_command_line(tmp_path):
    from fundament.engine.vllm_server import VLLMServer

    py = tmp_path / "python"
    py.write_text("")
    srv = VLLMServer("m", tmp_path, VLLMSpec(python=str(py), port=8123, max_model_len=4096, args=["--enforce-eager"]))
    cmd = srv.command()
    assert cmd[:3] == [str(py), "-m", "vllm.entrypoints.openai.api_server"]
    for flag, value in [("--served-model-name", "m"), ("--port", "8123"), ("--max-model-len", "4096")]:
        assert cmd[cmd.index(flag) + 1] == value
    assert "--enable-lora" in cmd and cmd[-1] == "--enforce-eager"
    assert json.loads(cmd[cmd.index("--structured-outputs-config") + 1]) == {"backend": "guidance"}
    assert srv.environment()["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
