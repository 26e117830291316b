"""The trainer's limits: every numeric setting has a finite range (Infinity, NaN and 1e308 are
refused with the setting's name), and a run that diverges anyway stops at the step it diverged
with what to change, having saved nothing. A tiny Llama with SmolLM2's tokenizer, no server."""

from __future__ import annotations

import math

import pytest
import torch
from tuning_data import sst2_chat, tiny_chat_llama

from fundament.adapt.examples import encode_example
from fundament.adapt.hyperparameters import RANGES, TuneConfig, resolve_hyperparameters
from fundament.adapt.tune import TuneHooks, fine_tune
from fundament.errors import FundamentError, InvalidRequestError
from fundament.models.tokenizer import ChatTokenizer

OPENAI = ("n_epochs", "batch_size", "learning_rate_multiplier")


def span(name) -> str:
    """A range as the messages and the docs write it: 1..50, 0.001..50."""
    kind, lo, hi = RANGES[name]
    return f"{lo}..{hi}" if kind is int else f"{lo:g}..{hi:g}"


def resolve(name, value):
    if name in OPENAI:
        return resolve_hyperparameters({name: value}, 10)
    return resolve_hyperparameters({}, 10, {name: value})


@pytest.mark.parametrize("name", sorted(RANGES))
def test_every_numeric_setting_refuses_non_finite_and_out_of_range_values(name):
    kind, lo, hi = RANGES[name]
    param = f"hyperparameters.{name}" if name in OPENAI else name
    for bad in (math.inf, -math.inf, math.nan, 1e308, -1e308, 10**400, lo - 1, hi + 1, True, "3"):
        with pytest.raises(InvalidRequestError) as e:
            resolve(name, bad)
        assert e.value.param == param and e.value.message.startswith(f"{param} must be"), (bad, e.value.message)
        assert f"between {span(name).replace('..', ' and ')}" in e.value.message and len(e.value.message) < 120
    for good in (lo, hi):
        assert getattr(resolve(name, good), name) == good and type(getattr(resolve(name, good), name)) is kind
    if kind is int:
        with pytest.raises(InvalidRequestError, match="must be an integer"):
            resolve(name, lo + 0.5)


def test_the_documented_ranges_are_the_enforced_ones():
    """docs/fine-tuning.md states each range; it must say what RANGES enforces."""
    from conftest import REPO

    doc = (REPO / "docs" / "fine-tuning.md").read_text()
    for name in RANGES:
        row = next(line for line in doc.splitlines() if line.startswith(f"| `{name}` |"))
        assert span(name) in row.replace(",", ""), (name, row)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    d = tiny_chat_llama(tmp_path_factory.getbasetemp())
    tok = ChatTokenizer(d)
    yield d, [encode_example(tok, r, 512) for r in sst2_chat(6)]
    torch.set_num_threads(threads)


class Steps(TuneHooks):
    def __init__(self):
        self.steps, self.checkpoints = [], []

    def on_step(self, step, total, metrics):
        self.steps.append(metrics["train_loss"])

    def on_checkpoint(self, step, path):
        self.checkpoints.append(step)


@pytest.mark.parametrize(
    "setting, step, what",
    [
        # alpha / r overflows float32: the LoRA output is 0 * inf = NaN from the first forward pass
        ({"lora_alpha": 1e308}, 1, "the training loss became non-finite (nan)"),
        # a finite loss and gradients, then decay multiplies every weight by about -1e304
        ({"weight_decay": 1e308}, 1, "the adapter's weights became non-finite in the optimizer's update"),
    ],
)
def test_a_run_that_diverges_stops_at_its_step_and_saves_nothing(tiny, tmp_path, setting, step, what):
    base, train = tiny
    # TuneConfig directly: these values get past no request, but a run must not trust that
    cfg = TuneConfig(n_epochs=2, batch_size=2, learning_rate_multiplier=1.0, seed=3, **setting)
    hooks = Steps()
    with pytest.raises(FundamentError) as e:
        fine_tune(base, train, None, cfg, tmp_path / "job", hooks)
    assert e.value.code == "training_diverged"
    assert e.value.message.startswith(
        f"Training diverged at step {step}: {what}. Lower learning_rate_multiplier (it is 1, a learning rate of 0.0002)"
    )
    assert hooks.steps == [] and hooks.checkpoints == []  # no step with a NaN loss was reported
    assert not (tmp_path / "job" / "adapter").exists() and not (tmp_path / "job" / "checkpoints").exists()


def test_a_sane_run_is_not_stopped(tiny, tmp_path):
    base, train = tiny
    cfg = resolve_hyperparameters(
        {"n_epochs": 2, "batch_size": 2, "learning_rate_multiplier": 50},
        6,
        {"lora_alpha": 1024, "weight_decay": 1.0},
        seed=3,
    )
    hooks = Steps()
    res = fine_tune(base, train, None, cfg, tmp_path / "job", hooks)
    assert res.steps == 6 and len(hooks.steps) == 6 and all(math.isfinite(x) for x in hooks.steps)
    assert hooks.checkpoints == [3, 6] and (res.adapter_dir / "adapter_model.safetensors").exists()
