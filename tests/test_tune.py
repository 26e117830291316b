"""The LoRA trainer: what it learns from (assistant tokens only), packing, the files it writes,
determinism, and resuming a stopped run to the same result as an uninterrupted one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama
from safetensors.torch import load_file

from fundament.adapt.examples import IGNORE, encode_example, pack
from fundament.adapt.hyperparameters import resolve_hyperparameters
from fundament.adapt.trainer import Trainer
from fundament.adapt.tune import TuneHooks, fine_tune
from fundament.errors import InvalidRequestError
from fundament.models.tokenizer import ChatTokenizer

REVIEW = "Determine the sentiment of this review: '{}'"


def chat(text: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": REVIEW.format(text)}, {"role": "assistant", "content": answer}]}


@pytest.fixture(scope="module")
def tiny_chat(smollm_dir, tmp_path_factory) -> Path:
    """A tiny random Llama that speaks SmolLM2's tokenizer and chat template."""
    # embeddings large enough that a 64-wide model can put a clear maximum on one of 49,152 tokens
    d = make_tiny_llama(tmp_path_factory.mktemp("tiny-chat"), vocab_size=49152, init_std=0.2)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (smollm_dir / f).exists():
            shutil.copy(smollm_dir / f, d / f)
    return d


@pytest.fixture(scope="module")
def tok(tiny_chat) -> ChatTokenizer:
    return ChatTokenizer(tiny_chat)


def learned(tok, ex) -> str:
    return tok.hf.decode([t for t in ex.labels if t != IGNORE])


def test_chat_example_learns_only_the_answer_as_the_server_prompts_it(tok):
    rec = chat("a gorgeous film", "positive")
    ex = encode_example(tok, rec, 2048)
    assert learned(tok, ex) == "positive<|im_end|>"
    prompt = tok.apply_chat_template(rec["messages"][:1])  # what the server sends the engine
    assert ex.input_ids[: len(prompt)] == prompt
    assert tok.hf.decode(ex.input_ids[len(prompt) :]).startswith("positive<|im_end|>")
    # labels are next-token targets: position t holds token t+1
    first = next(t for t, y in enumerate(ex.labels) if y != IGNORE)
    assert first == len(prompt) - 1 and ex.labels[first] == ex.input_ids[first + 1]


def test_weight_zero_turns_and_other_roles_carry_no_loss(tok):
    rec = {
        "messages": [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "skipme", "weight": 0},
            {"role": "user", "content": "second"},
            {"role": "assistant", "content": "learnme"},
        ]
    }
    assert learned(tok, encode_example(tok, rec, 2048)) == "learnme<|im_end|>"


def test_prompt_completion_example(tok):
    ex = encode_example(tok, {"prompt": "Review: great. Sentiment:", "completion": " positive"}, 2048)
    assert learned(tok, ex) == " positive" + tok.hf.decode(tok.eos_token_ids[:1])
    assert tok.hf.decode(ex.input_ids).startswith("Review: great. Sentiment: positive")


@pytest.mark.parametrize(
    "record, message",
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
        (
            {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
            "unknown role 'robot'",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", "weight": 0}]},
            "weight 0",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", "weight": 2}]},
            "weight must be 0 or 1",
        ),
        ({"text": "hello"}, "needs 'messages'"),
        (
            {"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "x"}]},
            "more than the model's context window of 256",
        ),
    ],
)
def test_unusable_examples_say_why(tok, record, message):
    with pytest.raises(ValueError, match=message):
        encode_example(tok, record, 256)


def test_packing_keeps_examples_apart(tiny_chat, tok):
    exs = [
        encode_example(tok, chat(t, a), 2048)
        for t, a in [("good", "positive"), ("a long and dull film", "negative"), ("fine", "positive")]
    ]
    rows = pack(exs, 1024)
    assert len(rows) == 1 and sum(e.n_tokens for e in rows[0]) == sum(e.n_tokens for e in exs)
    assert [len(r) for r in pack(exs, exs[0].n_tokens + 1)] == [1, 1, 1]
    trainer = Trainer(tiny_chat, resolve_hyperparameters({}, 3), bf16=False)  # exact fp32 sums
    with torch.no_grad():
        packed, n, _ = trainer.row_loss(rows[0])
        alone = [trainer.row_loss([e]) for e in exs]
    # one packed row scores exactly what the examples score apart: no attention across them
    assert n == sum(a[1] for a in alone)
    assert float(packed) == pytest.approx(sum(float(a[0]) for a in alone), rel=1e-5)


def test_auto_hyperparameters_and_bad_values():
    cfg = resolve_hyperparameters({"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}, 2000)
    assert (cfg.n_epochs, cfg.batch_size, cfg.learning_rate_multiplier) == (1, 4, 1.0)
    assert resolve_hyperparameters({}, 100).n_epochs == 10
    assert resolve_hyperparameters({"n_epochs": 2, "learning_rate_multiplier": 0.5}, 10).learning_rate == pytest.approx(
        1e-4
    )
    for req, param in [
        ({"n_epochs": 0}, "hyperparameters.n_epochs"),
        ({"batch_size": 1.5}, "hyperparameters.batch_size"),
        ({"learning_rate_multiplier": "fast"}, "hyperparameters.learning_rate_multiplier"),
        ({"epochs": 3}, "hyperparameters"),
    ]:
        with pytest.raises(InvalidRequestError) as e:
            resolve_hyperparameters(req, 10)
        assert e.value.param == param
    with pytest.raises(InvalidRequestError) as e:
        resolve_hyperparameters({}, 10, {"target_modules": ["lm_head"]})
    assert e.value.param == "target_modules"


DATA = [
    ("a gorgeous film", "positive"),
    ("dull and lifeless", "negative"),
    ("a delight", "positive"),
    ("tedious", "negative"),
    ("warm and funny", "positive"),
    ("a mess", "negative"),
]


def tiny_run(tiny_chat, tok, out: Path, hooks=None, epochs=8):
    train = [encode_example(tok, chat(t, a), 2048) for t, a in DATA]
    cfg = resolve_hyperparameters(
        {"n_epochs": epochs, "batch_size": 2, "learning_rate_multiplier": 50}, len(train), {"lora_r": 8}, seed=7
    )
    return fine_tune(tiny_chat, train, train[:2], cfg, out, hooks)


class Recorder(TuneHooks):
    def __init__(self, pause_at=None):
        self.steps, self.checkpoints, self.messages, self.pause_at = [], [], [], pause_at

    def on_message(self, message):
        self.messages.append(message)

    def on_step(self, step, total, metrics):
        self.steps.append((step, total, metrics))

    def on_checkpoint(self, step, path):
        self.checkpoints.append((step, path))

    def should_stop(self):
        return "pause" if self.pause_at and self.steps[-1][0] == self.pause_at else None


def test_fine_tune_writes_a_peft_adapter_that_learned_the_task(tiny_chat, tok, tmp_path):
    from fundament.config import EngineConfig
    from fundament.engine import Engine, EngineRequest, SamplingParams
    from fundament.models.llama import LlamaModel

    rec = Recorder()
    res = tiny_run(tiny_chat, tok, tmp_path / "job", rec)
    assert res.stopped is None and res.steps == 24 and [s for s, *_ in rec.steps] == list(range(1, 25))
    assert res.trained_tokens == 8 * sum(encode_example(tok, chat(t, a), 2048).n_tokens for t, a in DATA)
    first, last = rec.steps[0][2], rec.steps[-1][2]
    assert last["train_loss"] < first["train_loss"] / 4 and "valid_loss" in last and "full_valid_loss" in res.metrics
    assert [s for s, _ in rec.checkpoints] == [3, 6, 9, 12, 15, 18, 21, 24]  # one per epoch
    files = sorted(p.name for p in res.adapter_dir.iterdir())
    assert files == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "fundament_tune.json",
    ] or files == ["adapter_config.json", "adapter_model.safetensors", "fundament_tune.json"]
    saved = json.loads((res.adapter_dir / "fundament_tune.json").read_text())
    assert (
        saved["config"]["n_epochs"] == 8
        and saved["config"]["learning_rate"] == pytest.approx(1e-2)
        and saved["trained_tokens"] == res.trained_tokens
    )
    assert json.loads((res.adapter_dir / "adapter_config.json").read_text())["r"] == 8
    assert not (tmp_path / "job" / "resume").exists()

    # served by the engine, the adapter answers the training task; the base model does not
    engine = Engine(LlamaModel.from_dir(tiny_chat), EngineConfig(), tok.eos_token_ids)
    engine.load_adapter("ft", res.adapter_dir)
    prompt = tok.apply_chat_template(chat("a gorgeous film", "")["messages"][:1])

    def greedy(adapter):
        out = []
        req = EngineRequest(prompt, SamplingParams(max_tokens=4, temperature=0), out.append, adapter=adapter)
        engine.submit(req)
        while not req.finished:
            engine.step()
        return tok.decode([o.token_id for o in out])

    assert greedy("ft") == "positive"
    assert greedy(None) != "positive"


def test_a_paused_run_resumes_to_the_same_adapter(tiny_chat, tok, tmp_path):
    whole = tiny_run(tiny_chat, tok, tmp_path / "whole", epochs=2)
    rec = Recorder(pause_at=4)
    part = tiny_run(tiny_chat, tok, tmp_path / "parted", rec, epochs=2)
    assert part.stopped == "pause" and part.steps == 4 and part.adapter_dir is None
    assert (tmp_path / "parted" / "resume" / "state.pt").exists()
    rest = Recorder()
    done = tiny_run(tiny_chat, tok, tmp_path / "parted", rest, epochs=2)
    assert [s for s, *_ in rest.steps] == [5, 6] and done.trained_tokens == whole.trained_tokens
    a = load_file(whole.adapter_dir / "adapter_model.safetensors")
    b = load_file(done.adapter_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and the same seed gives the same adapter again (a deterministic run)
    again = tiny_run(tiny_chat, tok, tmp_path / "again", epochs=2)
    c = load_file(again.adapter_dir / "adapter_model.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a)


class CancelAtOnce(Recorder):
    def should_stop(self):
        return "cancel"


def test_compiled_layers_score_as_eager_learn_the_task_and_a_cancel_does_not_wait_for_the_compiler(
    tiny_chat, tok, tmp_path
):
    # A cancel that comes while the layers compile stops the run before its first step.
    rec = CancelAtOnce()
    train = [encode_example(tok, chat(t, a), 2048) for t, a in DATA]
    cfg = resolve_hyperparameters({"n_epochs": 2, "batch_size": 2}, len(train), {"compile": True}, seed=7)
    stopped = fine_tune(tiny_chat, train, None, cfg, tmp_path / "cancelled", rec)
    assert stopped.stopped == "cancel" and stopped.steps == 0 and rec.steps == []

    # The compiled layers compute the loss eager bf16 computes, to bf16's precision.
    trainer = Trainer(tiny_chat, resolve_hyperparameters({}, 6), bf16=True)
    torch.manual_seed(0)
    for name, p in trainer.model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    row = pack(train, 1024)[0]
    with torch.no_grad():
        eager = float(trainer.row_loss(row)[0])
        assert trainer.compile()
        compiled = float(trainer.row_loss(row)[0])
    assert compiled == pytest.approx(eager, rel=2e-2) and compiled != eager  # not the same kernels

    # A compiled run learns the task, and says it was compiled.
    rec = Recorder()
    cfg = resolve_hyperparameters(
        {"n_epochs": 8, "batch_size": 2, "learning_rate_multiplier": 50},
        len(train),
        {"lora_r": 8, "compile": True},
        seed=7,
    )
    res = fine_tune(tiny_chat, train, train[:2], cfg, tmp_path / "compiled", rec)
    assert len(rec.messages) == 1 and rec.messages[0].startswith(
        "Compiling the model's layers"
    )  # why the first step waits
    assert res.stopped is None and rec.steps[-1][2]["train_loss"] < rec.steps[0][2]["train_loss"] / 4
    assert json.loads((res.adapter_dir / "fundament_tune.json").read_text())["compiled"] is True


def test_without_a_cxx_compiler_training_runs_uncompiled(tiny_chat, tok, tmp_path, monkeypatch):
    import torch._inductor.config as inductor

    monkeypatch.setattr(inductor.cpp, "cxx", ("/nonexistent/g++",))
    train = [encode_example(tok, chat(t, a), 2048) for t, a in DATA]
    cfg = resolve_hyperparameters({"n_epochs": 1, "batch_size": 2}, len(train), {"compile": True}, seed=7)
    res = fine_tune(tiny_chat, train, None, cfg, tmp_path / "job")
    assert res.stopped is None and res.steps == 3
    assert json.loads((res.adapter_dir / "fundament_tune.json").read_text())["compiled"] is False


def test_compile_auto_only_for_runs_long_enough_to_pay_for_it(tok):
    from fundament.adapt.trainer import COMPILE_MIN_TOKENS, should_compile

    ex = encode_example(tok, chat("a gorgeous film", "positive"), 2048)
    few = [ex] * (COMPILE_MIN_TOKENS // ex.n_tokens // 2)
    assert not should_compile(resolve_hyperparameters({"n_epochs": 1}, len(few)), few)
    assert should_compile(resolve_hyperparameters({"n_epochs": 2}, len(few)), few + [ex] * 2)
    assert should_compile(resolve_hyperparameters({}, 1, {"compile": True}), [ex])
    with pytest.raises(InvalidRequestError) as e:
        resolve_hyperparameters({}, 10, {"compile": "always"})
    assert e.value.param == "compile"
