"""The hyperparameters of a LoRA run: TuneConfig (saved beside the adapter it made), the ranges
every number is checked against (RANGES), and "auto" resolved from the number of examples as
OpenAI resolves it. Knows no model, no data and no training loop.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidRequestError

PLACEMENT = ("nproc_per_node", "nnodes", "distributed")  # how a run is spread, not what it learns
BASE_LEARNING_RATE = 2e-4  # LoRA's usual rate; learning_rate_multiplier scales it (OpenAI's knob)
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TuneConfig:
    """Everything that decides the result of a run; saved beside the adapter it made."""

    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    seed: int = 0
    # ---- fundament extensions (documented in docs/fine-tuning.md) ----
    method: str = "lora"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR))
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    eval_every: int = 0  # steps between validation passes; 0: about ten per run
    row_tokens: int = 1024  # examples are packed into rows of at most this many tokens
    compile: bool | str = "auto"  # torch.compile the decoder layers: True, False, or "auto" (long runs)
    # Where it runs (PLACEMENT): processes per node and nodes of a torchrun job, DDP or FSDP.
    nproc_per_node: int = 1
    nnodes: int = 1
    distributed: str = "ddp"

    @property
    def learning_rate(self) -> float:
        return BASE_LEARNING_RATE * self.learning_rate_multiplier

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "learning_rate": self.learning_rate}


def _auto_epochs(n: int) -> int:
    # Like OpenAI's auto: small sets get more passes so the model sees ~1,000 examples at least.
    return max(1, min(10, math.ceil(1000 / max(n, 1)))) if n < 1000 else 1


def _auto_batch(n: int) -> int:
    # About 0.2% of the examples (as OpenAI's auto), between 1 and 32.
    return max(1, min(32, round(n * 0.002)))


# The ranges (inclusive) every numeric setting is checked against, in one
# place: the server's 400s, the worker's checks and docs/fine-tuning.md all follow this table.
# Outside them a run is absurd (1e308, Infinity) or cannot train at all.
RANGES: dict[str, tuple[type, float, float]] = {
    "n_epochs": (int, 1, 50),
    "batch_size": (int, 1, 256),
    "learning_rate_multiplier": (float, 1e-3, 50.0),
    "lora_r": (int, 1, 256),
    "lora_alpha": (float, 1e-3, 1024.0),
    "lora_dropout": (float, 0.0, 0.99),
    "warmup_ratio": (float, 0.0, 0.99),
    "weight_decay": (float, 0.0, 1.0),
    "eval_every": (int, 0, 1_000_000),
    "row_tokens": (int, 64, 16384),
    "nproc_per_node": (int, 1, 64),
    "nnodes": (int, 1, 1024),
}


def _checked_number(name: str, value: Any, param: str) -> int | float:
    """`value` as RANGES says `name` must be: a finite number of its kind, within its range."""
    kind, lo, hi = RANGES[name]
    shown = repr(value) if len(repr(value)) <= 32 else repr(value)[:29] + "..."
    span = f"between {lo} and {hi}" if kind is int else f"between {lo:g} and {hi:g}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequestError(
            f"{param} must be {'an integer' if kind is int else 'a number'} {span}, got {shown}.", param
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidRequestError(f"{param} must be a finite number {span}, got {shown}.", param)
    if not lo <= value <= hi:  # exact for ints of any size, so 10**400 is refused here, not overflowed
        raise InvalidRequestError(f"{param} must be {span}, got {shown}.", param)
    if kind is int and value != int(value):
        raise InvalidRequestError(f"{param} must be an integer {span}, got {shown}.", param)
    return kind(value)


def resolve_hyperparameters(
    requested: dict[str, Any] | None, n_examples: int, extensions: dict[str, Any] | None = None, seed: int = 0
) -> TuneConfig:
    """Turn OpenAI's hyperparameters ("auto" or numbers) and our extensions into a TuneConfig.
    "auto": n_epochs = ceil(1000 / n) between 1 and 10 (1 from 1,000 examples up), batch_size = 0.2%
    of the examples between 1 and 32, learning_rate_multiplier = 1 (learning rate 2e-4). Every
    number must be finite and within RANGES; an InvalidRequestError names the first that is not."""
    req = dict(requested or {})

    def number(name, auto):
        v = req.pop(name, "auto")
        return auto if v is None or v == "auto" else _checked_number(name, v, f"hyperparameters.{name}")

    cfg = TuneConfig(
        n_epochs=number("n_epochs", _auto_epochs(n_examples)),
        batch_size=number("batch_size", _auto_batch(n_examples)),
        learning_rate_multiplier=number("learning_rate_multiplier", 1.0),
        seed=int(seed),
    )
    if req:
        raise InvalidRequestError(f"unknown hyperparameter(s): {', '.join(sorted(req))}.", "hyperparameters")
    ext = dict(extensions or {})
    if ext.get("method", "lora") != "lora":
        raise InvalidRequestError(f"method {ext['method']!r} is not supported; use 'lora'.", "method")
    ext.pop("method", None)
    known = {f.name: f for f in dataclasses.fields(TuneConfig)}
    for name, value in ext.items():
        if name not in known or name in ("n_epochs", "batch_size", "learning_rate_multiplier", "seed"):
            raise InvalidRequestError(f"unknown fine-tuning option {name!r}.", name)
        setattr(cfg, name, _checked_number(name, value, name) if name in RANGES else value)
    bad = [t for t in (cfg.target_modules if isinstance(cfg.target_modules, list) else [None]) if t not in ALL_LINEAR]
    if bad or not cfg.target_modules:
        raise InvalidRequestError(
            f"target_modules must be a non-empty list drawn from {ALL_LINEAR}, got {cfg.target_modules!r}.",
            "target_modules",
        )
    if cfg.distributed not in ("ddp", "fsdp"):
        raise InvalidRequestError(f"distributed must be 'ddp' or 'fsdp', got {cfg.distributed!r}.", "distributed")
    if cfg.compile not in (True, False, "auto"):
        raise InvalidRequestError(f"compile must be true, false or 'auto', got {cfg.compile!r}.", "compile")
    return cfg
