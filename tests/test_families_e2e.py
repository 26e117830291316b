"""Each model family served by path through a real `fundament serve` and the official `openai`
client: tiny random models of every native family and of architectures the transformers fallback
serves, each with SmolLM2's tokenizer and chat template. /health says which path serves each; chat
streams what it answers whole; structured output and tool calls are enforced on the fallback (tools
described by a template that offers them itself, or by fundament);
classification scores on it; and a fine-tuning job on every family succeeds and its ft: model is
served at once, answering unlike its base."""

from __future__ import annotations

import json
import shutil
import time

import openai
import pytest
from conftest import ServerProcess, post
from test_model_families import make_family
from test_transformers_fallback import make_model
from tuning_data import sst2_chat

pytestmark = pytest.mark.slow

# A chat template that offers tools itself, as Qwen 2.5's does (the Hermes convention): given to
# the tiny Qwen2, whose requests with tools the template then describes.
HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n# Tools\n<tools>\n{%- for tool in tools %}\n{{ tool | tojson }}"
    "{%- endfor %}\n</tools>\nFor each function call, return a json object within <tool_call></tool_call>"
    " XML tags.<|im_end|>\n{%- endif %}"
    "{%- for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)
NATIVE = ["llama-3.x", "mistral", "qwen2", "qwen3", "phi4-mini", "gemma2"]
FALLBACK = ["gpt2", "opt"]
VOCAB = 49152  # SmolLM2's
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def family_server(smollm_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    dirs = []
    for name in NATIVE + FALLBACK:
        d = root / f"tiny-{name}"
        shape = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2)
        if name in NATIVE:
            make_family(d, name, **shape, max_position_embeddings=1024)
        else:
            make_model(d, name, **shape)
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
            if (smollm_dir / f).exists():
                shutil.copy(smollm_dir / f, d / f)
        if name == "qwen2":
            (d / "chat_template.jinja").write_text(HERMES_TEMPLATE)
        dirs.append(d)
    base = root / "tiny-gpt2-base"  # a base model: no chat template in its tokenizer
    make_model(base, "gpt2", vocab_size=VOCAB, bos_token_id=1, eos_token_id=2)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm_dir / f, base / f)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    dirs.append(base)
    args = ["--no-default-models"] + [x for d in dirs for x in ("--model", str(d))]
    srv = ServerProcess(args, tmp_path_factory.mktemp("families-home"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def c(family_server):
    return openai.OpenAI(base_url=family_server.base_url, api_key="sk-test", max_retries=0, timeout=300)


def ask(c, model: str, text: str, **kw):
    kw.setdefault("max_completion_tokens", 12)
    return c.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], temperature=0, **kw)


def test_health_says_which_path_serves_each_model(family_server):
    engines = family_server.health()["engines"]
    assert {n: e["path"] for n, e in engines.items()} == {
        **{f"tiny-{n}": "native" for n in NATIVE},
        **{f"tiny-{n}": "transformers" for n in FALLBACK},
        "tiny-gpt2-base": "transformers",
    }
    assert "architecture GPT2LMHeadModel is not supported" in engines["tiny-gpt2"]["path_reason"]
    assert "path_reason" not in engines["tiny-qwen3"]


@pytest.mark.parametrize("name", NATIVE + FALLBACK)
def test_chat_streams_what_it_answers_whole(c, name):
    whole = ask(c, f"tiny-{name}", "Hello there, how are you?")
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 12
    stream = ask(c, f"tiny-{name}", "Hello there, how are you?", stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == whole.choices[0].message.content


def test_a_base_model_without_a_chat_template_serves_completions_and_says_why_not_chat(c):
    r = c.completions.create(model="tiny-gpt2-base", prompt="Once upon a time", max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8
    with pytest.raises(openai.BadRequestError, match="no chat template") as e:
        ask(c, "tiny-gpt2-base", "Hello")
    assert e.value.body["param"] == "model"


@pytest.mark.parametrize("name", FALLBACK)
def test_structured_output_is_enforced_on_the_fallback(c, name):
    schema = {
        "type": "object",
        "properties": {"label": {"enum": ["positive", "negative"]}},
        "required": ["label"],
        "additionalProperties": False,
    }
    r = ask(
        c,
        f"tiny-{name}",
        "Sentiment of: great film",
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": True}},
        max_completion_tokens=64,
    )
    assert json.loads(r.choices[0].message.content)["label"] in ("positive", "negative")


def test_a_template_that_offers_tools_describes_them_itself(family_server):
    """Where the model's template offers tools in the convention calls are parsed in, the prompt
    is the template's own; elsewhere fundament describes the tools in the system message."""
    from fundament.adapt.chat import render_chat
    from fundament.models.tokenizer import ChatTokenizer

    root = family_server.log.parent.parent
    hermes, plain = (ChatTokenizer(next(root.glob(f"families*/tiny-{n}"))) for n in ("qwen2", "llama-3.x"))
    assert hermes.hermes_tools and not plain.hermes_tools
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    chat = render_chat(msgs, [WEATHER], "auto", template_tools=True)
    text = hermes.hf.decode(hermes.encode_prompt(chat.messages, chat.template_tools))
    assert "<tools>" in text and '"name": "get_weather"' in text and "You can call these functions" not in text
    chat = render_chat(msgs, [WEATHER], "auto", template_tools=False)
    text = plain.hf.decode(plain.encode_prompt(chat.messages, chat.template_tools))
    assert "<tools>" not in text and "You can call these functions" in text and "get_weather" in text


@pytest.mark.parametrize("name", ["qwen2", *FALLBACK])
def test_tool_calls_are_enforced_through_either_description(c, name):
    r = ask(
        c,
        f"tiny-{name}",
        "Weather in Paris?",
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        max_completion_tokens=80,
    )
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)


@pytest.mark.parametrize("name", FALLBACK)
def test_classification_scores_every_label_on_the_fallback(family_server, name):
    r = post(
        family_server,
        "/classifications",
        {"model": f"tiny-{name}", "labels": ["positive", "negative", "neutral"], "input": ["great film", "dull"]},
    )
    assert r.status_code == 200, r.text
    for d in r.json()["data"]:
        assert sum(d["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
        assert d["label"] == max(d["probabilities"], key=d["probabilities"].get)
    a, b = (d["probabilities"] for d in r.json()["data"])
    assert a != b  # the input matters: the scores are the model's


def test_a_fine_tuning_job_on_every_family_serves_its_model(c):
    train = c.files.create(
        file=("train.jsonl", "".join(json.dumps(r) + "\n" for r in sst2_chat(10)).encode()), purpose="fine-tune"
    ).id
    hp = {"n_epochs": 3, "learning_rate_multiplier": 20, "batch_size": 2}
    jobs = {
        name: c.fine_tuning.jobs.create(
            model=f"tiny-{name}",
            training_file=train,
            seed=1,
            method={"type": "supervised", "supervised": {"hyperparameters": hp}},
        )
        for name in NATIVE + FALLBACK
    }
    deadline = time.time() + 900
    done = {}
    while len(done) < len(jobs) and time.time() < deadline:
        for name, job in jobs.items():
            if name not in done:
                j = c.fine_tuning.jobs.retrieve(job.id)
                if j.status in ("succeeded", "failed", "cancelled"):
                    done[name] = j
        time.sleep(1)
    assert {n: j.status for n, j in done.items()} == {n: "succeeded" for n in jobs}, {
        n: j.error.message for n, j in done.items() if j.error
    }
    prompt = sst2_chat(1)[0]["messages"][0]["content"]
    for name, job in done.items():
        assert job.trained_tokens and job.fine_tuned_model.startswith(f"ft:tiny-{name}")
        tuned = ask(c, job.fine_tuned_model, prompt).choices[0].message.content
        base = ask(c, f"tiny-{name}", prompt).choices[0].message.content
        assert tuned != base, name  # the adapter is applied to the served model


def test_lora_targets_a_model_lacks_are_a_400_at_create_with_no_job(c):
    """GPT-2 names its projections its own way (c_attn, c_proj): a job naming only q_proj and v_proj
    would adapt nothing, so it is refused before it exists, not failed later in the worker."""
    train = c.files.create(
        file=("train.jsonl", "".join(json.dumps(r) + "\n" for r in sst2_chat(4)).encode()), purpose="fine-tune"
    ).id
    before = len(c.fine_tuning.jobs.list(limit=100).data)
    with pytest.raises(openai.BadRequestError) as e:
        c.fine_tuning.jobs.create(
            model="tiny-gpt2", training_file=train, extra_body={"target_modules": ["q_proj", "v_proj"]}
        )
    assert e.value.body["param"] == "target_modules" and "no module of this gpt2 model" in e.value.body["message"]
    assert len(c.fine_tuning.jobs.list(limit=100).data) == before
    # where the model stores them fused (Phi-4-mini's qkv_proj), the same names are taken
    job = c.fine_tuning.jobs.create(
        model="tiny-phi4-mini", training_file=train, extra_body={"target_modules": ["q_proj", "v_proj"]}
    )
    c.fine_tuning.jobs.cancel(job.id)
