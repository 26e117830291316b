"""Supervised fine-tuning with LoRA: examples in, a PEFT adapter directory out.

Owns the loss mask (assistant tokens only, OpenAI's `weight`), "auto" hyperparameters, packing
examples into rows, the training loop, checkpoints, and resuming after a crash. Knows nothing of
jobs, SQLite or HTTP: the caller passes `TuneHooks` to hear progress and to ask it to stop.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import FundamentError, InvalidRequestError
from ..models.tokenizer import ChatTokenizer
from .chat import render_chat

BASE_LEARNING_RATE = 2e-4  # LoRA's usual rate; learning_rate_multiplier scales it (OpenAI's knob)
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RESUME_EVERY_S = 10.0  # how much training a crash may cost at most (plus one step)
# compile "auto": compile the decoder layers when the run trains at least this many tokens. The
# compilation costs 15-45 s on 2 cores, and the compiled steps are ~1.25x faster: below this,
# it would not pay for itself.
COMPILE_MIN_TOKENS = 50_000
IGNORE = -100


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
}


def _checked_number(name: str, value: Any, param: str) -> int | float:
    """`value` as RANGES says `name` must be: a finite number of its kind, within its range."""
    kind, lo, hi = RANGES[name]
    shown = repr(value) if len(repr(value)) <= 32 else repr(value)[:29] + "..."
    span = f"between {lo} and {hi}" if kind is int else f"between {lo:g} and {hi:g}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequestError(f"{param} must be {'an integer' if kind is int else 'a number'} {span}, got {shown}.", param)
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidRequestError(f"{param} must be a finite number {span}, got {shown}.", param)
    if not lo <= value <= hi:  # exact for ints of any size, so 10**400 is refused here, not overflowed
        raise InvalidRequestError(f"{param} must be {span}, got {shown}.", param)
    if kind is int and value != int(value):
        raise InvalidRequestError(f"{param} must be an integer {span}, got {shown}.", param)
    return kind(value)


def resolve_hyperparameters(requested: dict[str, Any] | None, n_examples: int, extensions: dict[str, Any] | None = None, seed: int = 0) -> TuneConfig:
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
        raise InvalidRequestError(f"target_modules must be a non-empty list drawn from {ALL_LINEAR}, got {cfg.target_modules!r}.", "target_modules")
    if cfg.compile not in (True, False, "auto"):
        raise InvalidRequestError(f"compile must be true, false or 'auto', got {cfg.compile!r}.", "compile")
    return cfg


# ---- examples --------------------------------------------------------------------------------


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # the next token to predict at each position, IGNORE where no loss

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def n_loss_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def encode_example(tokenizer: ChatTokenizer, record: dict, max_len: int) -> Example:
    """Token ids and labels for one training record (chat or prompt/completion format). The ids
    are built turn by turn exactly as the server prompts at inference (template up to the
    assistant's header, then the answer), and only learned assistant turns carry labels: their
    text and end-of-turn token. Raises ValueError saying what is wrong with the record."""
    if not isinstance(record, dict):
        raise ValueError("each line must be a JSON object")
    ids: list[int] = []
    learn_mask: list[bool] = []
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("'messages' must be a non-empty list")
        try:
            msgs, learn, _, _ = render_chat(msgs, record.get("tools"))  # as the server renders it
        except InvalidRequestError as e:  # one line's problem, listed with the file's others
            raise ValueError(e.message.rstrip(".")) from None
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError("the example has no assistant message")
        if not learn:
            raise ValueError("every assistant message has weight 0: there is nothing to learn")
        hf, eot = tokenizer.hf, set(tokenizer.eos_token_ids)
        done = ""
        for j, m in enumerate(msgs):
            before = hf.apply_chat_template(msgs[:j], add_generation_prompt=m["role"] == "assistant", tokenize=False) if j else ""
            after = hf.apply_chat_template(msgs[: j + 1], tokenize=False)
            if not (before.startswith(done) and after.startswith(before)):
                raise ValueError("the model's chat template cannot render this conversation turn by turn")
            head, body = tokenizer.encode(before[len(done):]), tokenizer.encode(after[len(before):])
            ids += head + body
            learn_mask += [False] * len(head)
            if j in learn:  # the answer and its end-of-turn token; what follows it is the next turn's
                end = next((k + 1 for k, t in enumerate(body) if t in eot), len(body))
                learn_mask += [True] * end + [False] * (len(body) - end)
            else:
                learn_mask += [False] * len(body)
            done = after
    elif "prompt" in record or "completion" in record:
        p, c = record.get("prompt"), record.get("completion")
        if not isinstance(p, str) or not isinstance(c, str) or not c:
            raise ValueError("a prompt/completion example needs a string 'prompt' and a non-empty string 'completion'")
        head, body = tokenizer.encode(p), tokenizer.encode(c) + tokenizer.eos_token_ids[:1]
        ids, learn_mask = head + body, [False] * len(head) + [True] * len(body)
    else:
        raise ValueError("an example needs 'messages' (chat format) or 'prompt' and 'completion'")
    if len(ids) > max_len:
        raise ValueError(f"the example is {len(ids)} tokens long, more than the model's context window of {max_len}")
    # position t predicts token t+1: a label at t when token t+1 is learned
    labels = [ids[t + 1] if learn_mask[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]
    return Example(ids, labels)


def pack(examples: list[Example], row_tokens: int) -> list[list[Example]]:
    """First-fit-decreasing: rows of whole examples, each row at most row_tokens long (a longer
    example gets a row of its own). Rows are trained as one sequence with a block-diagonal mask."""
    rows: list[list[Example]] = []
    room: list[int] = []
    for ex in sorted(examples, key=lambda e: -e.n_tokens):
        for i, r in enumerate(room):
            if ex.n_tokens <= r:
                rows[i].append(ex)
                room[i] -= ex.n_tokens
                break
        else:
            rows.append([ex])
            room.append(row_tokens - ex.n_tokens)
    return rows


def _row_tensors(row: list[Example]):
    ids = torch.tensor([t for ex in row for t in ex.input_ids]).unsqueeze(0)  # (1, T)
    labels = torch.tensor([t for ex in row for t in ex.labels])  # (T,)
    # positions restart at 0 for each example (rotary positions); attention keeps examples apart
    pos = torch.tensor([p for ex in row for p in range(ex.n_tokens)]).unsqueeze(0)  # (1, T)
    return ids, labels, pos


PACKED_ATTENTION = "fundament_packed"


def _packed_layout(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """How a row of examples (lengths) maps to a padded batch (S examples, L = the longest): for
    each batch slot the row position it takes (padding repeats its example's first token), and
    for each row position its slot."""
    S, L = len(lengths), max(lengths)
    take, slots, start = [], [], 0
    for s, n in enumerate(lengths):
        take += list(range(start, start + n)) + [start] * (L - n)
        slots += range(s * L, s * L + n)
        start += n
    return torch.tensor(take), torch.tensor(slots), S, L


def _packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, packed=None, **kwargs):
    """Attention for a packed row, as transformers' attention interface calls it: the examples are
    gathered into a padded batch and attend causally within themselves, one fused SDPA call. The
    same result as a block-diagonal mask over the whole row, at the cost of S * L^2 instead of
    T^2 and without a mask.
    query (1, H, T, D), key and value (1, KV heads, T, D); returns (1, T, H, D)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    take, slots, S, L = packed

    def batch(x):  # (1, h, T, D) -> (S, h, L, D)
        return x[0].index_select(1, take).unflatten(1, (S, L)).transpose(0, 1)

    # The math kernel: for examples of tens of tokens the CPU flash kernel's backward costs more
    # (a training step of SmolLM2-135M, 8 examples, was 8% faster with math).
    with sdpa_kernel([SDPBackend.MATH]):
        out = torch.nn.functional.scaled_dot_product_attention(
            batch(query), batch(key), batch(value), is_causal=True, scale=scaling, enable_gqa=query.shape[1] != key.shape[1],
        )  # (S, H, L, D); padded queries come after their example's tokens, so no real query sees them
    return out.transpose(1, 2).flatten(0, 1).index_select(0, slots).unsqueeze(0), None


def _register_packed_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_ATTENTION, _packed_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, lambda *args, **kwargs: None)  # no mask: the layout is the mask


# ---- the run ---------------------------------------------------------------------------------


class TuneHooks:
    """What the caller hears and how it stops a run. Subclass and override."""

    def on_step(self, step: int, total_steps: int, metrics: dict) -> None:
        pass

    def on_checkpoint(self, step: int, path: Path) -> None:
        pass

    def on_message(self, message: str) -> None:
        """Something the user should hear of, between steps (a job event)."""

    def should_stop(self) -> str | None:
        return None


@dataclass
class TuneResult:
    adapter_dir: Path | None
    stopped: str | None
    trained_tokens: int
    steps: int
    metrics: dict


def _save_dir_atomically(dest: Path, write) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".tmp-"))
    try:
        write(tmp)
        if dest.exists():
            old = dest.with_name(f".old-{dest.name}-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The resume state a crashed or paused run continues from, if any."""
    p = Path(out_dir) / "resume"
    return p if (p / "state.pt").exists() else None


class _Trainer:
    def __init__(self, base_dir: Path, config: TuneConfig, bf16: bool | None = None):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        from ..models.device import cpu_supports_bf16

        _wait_for_compiles()
        self.config = config
        torch.manual_seed(config.seed)
        base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32, attn_implementation="sdpa")
        self.max_len = base.config.max_position_embeddings
        lora = LoraConfig(
            r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            target_modules=list(config.target_modules), bias="none", task_type="CAUSAL_LM",
        )
        _register_packed_attention()
        base.config._attn_implementation = PACKED_ATTENTION
        self.model = get_peft_model(base, lora)
        # bf16 matmuls where the CPU has them (AVX512-BF16/AMX); fp32 LoRA weights and loss.
        self.autocast = cpu_supports_bf16() if bf16 is None else bf16
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=config.weight_decay)
        inner = self.model.base_model.model
        self.body, self.head = inner.model, inner.lm_head
        self.compiled = False
        if self.autocast:
            self._frozen_to_bf16()

    def _frozen_to_bf16(self) -> None:
        """Autocast caches its bf16 copies only of weights that require grad, so it re-casts every
        frozen base weight on every forward, and every activation before each projection. The
        frozen base is stored in bf16 once instead (as the engine serves it); the LoRA weights,
        their optimizer state and the loss stay fp32."""
        for p in self.model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
        # PEFT casts each LoRA layer's input to the LoRA weights' fp32, which autocast then casts
        # straight back to bf16: exact, and an eighth of a step. Off (peft.helpers documents it).
        for m in self.model.modules():
            if hasattr(m, "cast_input_dtype_enabled"):
                m.cast_input_dtype_enabled = False

    def compile(self) -> bool:
        """torch.compile each decoder layer (one graph serves all: the layers share their code).
        Faster, since the compiled kernels fuse the elementwise work around the matmuls (norms,
        rotary, SiLU, the LoRA sums); and closer to float32 training, since fused bf16 sums are
        rounded once, not per op: eager bf16 rounds a LoRA update below half a bf16 step of the
        layer's output away, and early in training most are that small (on SmolLM2, one batch
        after the first step: fp32 loss 2.18, compiled bf16 2.17, eager bf16 3.07). If compiling
        fails, dynamo runs the layers eagerly instead; with no C++ compiler (inductor's CPU code
        is C++) nothing is compiled. Returns whether the layers were compiled."""
        import logging

        import torch._dynamo

        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        except Exception as e:  # noqa: BLE001 - any reason inductor cannot build is a reason to run eagerly
            logging.getLogger(__name__).warning("training runs uncompiled: %s", e)
            return False
        torch._dynamo.config.suppress_errors = True
        for layer in self.body.layers:
            layer.compile(dynamic=True)
        self.compiled = True
        return True

    def row_loss(self, row: list[Example]) -> tuple[torch.Tensor, int, int]:
        """Summed cross-entropy over the row's learned tokens, their count, and how many the model
        predicts right. Logits only where there are labels: the vocabulary projection is a fifth
        of a small model's compute and most positions carry no loss."""
        ids, labels, pos = _row_tensors(row)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            packed = _packed_layout([ex.n_tokens for ex in row])
            hidden = self.body(input_ids=ids, position_ids=pos, use_cache=False, packed=packed).last_hidden_state[0]  # (T, C)
            where = (labels != IGNORE).nonzero().squeeze(1)
            logits = self.head(hidden[where]).float()  # (N, V)
        target = labels[where]
        loss = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
        correct = int((logits.argmax(-1) == target).sum())
        return loss, len(where), correct

    @torch.no_grad()
    def evaluate(self, examples: list[Example]) -> tuple[float, float]:
        self.model.eval()
        total, n, right = 0.0, 0, 0
        for row in pack(examples, self.config.row_tokens):
            loss, k, c = self.row_loss(row)
            total, n, right = total + float(loss), n + k, right + c
        self.model.train()
        return total / max(n, 1), right / max(n, 1)

    def lr_at(self, step: int, total: int) -> float:
        """Linear warm-up, then linear decay to zero."""
        warm = max(1, int(total * self.config.warmup_ratio))
        if step < warm:
            return self.config.learning_rate * (step + 1) / warm
        return self.config.learning_rate * max(0.0, (total - step) / max(1, total - warm))

    @torch.no_grad()
    def weights_finite(self) -> bool:
        """Whether every trained weight is finite (one flag per tensor, one sync)."""
        return bool(torch.stack([p.isfinite().all() for p in self.params]).all())

    def adapter_state(self) -> dict:
        from peft import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model).items()}

    def save_adapter(self, dest: Path, extra: dict) -> None:
        def write(tmp: Path):
            self.model.save_pretrained(str(tmp))
            (tmp / "fundament_tune.json").write_text(json.dumps(extra, indent=2, default=str))

        _save_dir_atomically(dest, write)

    def save_resume(self, out_dir: Path, state: dict) -> None:
        def write(tmp: Path):
            torch.save({"adapter": self.adapter_state(), "optimizer": self.opt.state_dict(), **state}, tmp / "state.pt")

        _save_dir_atomically(out_dir / "resume", write)

    def load_resume(self, path: Path) -> dict:
        from peft import set_peft_model_state_dict

        state = torch.load(path / "state.pt", weights_only=False)
        set_peft_model_state_dict(self.model, state.pop("adapter"))
        self.opt.load_state_dict(state.pop("optimizer"))
        return state


def _epoch_batches(train: list[Example], config: TuneConfig, epoch: int) -> list[list[Example]]:
    order = list(range(len(train)))
    random.Random(config.seed * 1000 + epoch).shuffle(order)
    return [[train[i] for i in order[s : s + config.batch_size]] for s in range(0, len(order), config.batch_size)]


def should_compile(config: TuneConfig, train: list[Example]) -> bool:
    if config.compile != "auto":
        return bool(config.compile)
    return config.n_epochs * sum(ex.n_tokens for ex in train) >= COMPILE_MIN_TOKENS


_COMPILING: list = []  # warm-up threads still compiling after their run was stopped


def _wait_for_compiles() -> None:
    """Autocast's cast cache takes a mutex while the tracer holds the GIL: two threads tracing or
    training under autocast at once can deadlock. So a new trainer first lets a stopped run's
    compile finish (its kernels are then cached for this one)."""
    while _COMPILING:
        _COMPILING[0].join()
        _COMPILING.pop(0)


def _warm_up(trainer: _Trainer, row: list[Example], valid_row: list[Example] | None, hooks: TuneHooks) -> str | None:
    """Compile before the first step, in a thread, while this one keeps asking whether to stop:
    a cancel must not wait for the compiler. Returns the stop request, if one came (the compile
    then finishes in the background, and its kernels stay cached for the next run)."""
    import threading

    failed: list[BaseException] = []

    def run():
        try:
            loss, n, _ = trainer.row_loss(row)
            (loss / max(n, 1)).backward()  # compiles the backward too
            if valid_row:
                trainer.evaluate(valid_row)
        except BaseException as e:  # re-raised below, in the training thread
            failed.append(e)

    # Not a daemon: a process that exits while the compiler runs waits for it (killing the
    # thread mid-compile aborts the interpreter).
    t = threading.Thread(target=run, name="fundament-compile")
    t.start()
    while t.is_alive():
        t.join(0.5)
        if t.is_alive():
            stop = hooks.should_stop()
            if stop:
                _COMPILING.append(t)
                return stop
    trainer.opt.zero_grad(set_to_none=True)  # the warm-up's gradients are not a step
    if failed:
        raise failed[0]
    return None


def _diverged(step: int, what: str, config: TuneConfig) -> FundamentError:
    """A run whose loss, gradients or weights overflow has diverged: every later step is NaN and
    the adapter would answer nothing. The job fails with the step and what to change."""
    return FundamentError(
        f"Training diverged at step {step}: {what}. Lower learning_rate_multiplier (it is {config.learning_rate_multiplier:g}, "
        f"a learning rate of {config.learning_rate:g}) or lora_alpha (it is {config.lora_alpha:g}) and create the job again.",
        code="training_diverged",
    )


def fine_tune(base_dir: Path, train: list[Example], valid: list[Example] | None, config: TuneConfig, out_dir: Path, hooks: TuneHooks | None = None) -> TuneResult:
    """Train a LoRA adapter on `train`; write checkpoints (one per epoch, each a PEFT directory
    under out_dir/checkpoints/) and the final adapter (out_dir/adapter). Resumes by itself from
    out_dir/resume if an earlier run of the same job stopped part-way (crash or pause). A run whose
    loss, gradients or weights stop being finite raises FundamentError (code training_diverged)."""
    hooks = hooks or TuneHooks()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not train:
        raise InvalidRequestError("there are no training examples.", "training_file")
    trainer = _Trainer(Path(base_dir), config)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total = steps_per_epoch * config.n_epochs
    eval_every = config.eval_every or max(1, total // 10)
    valid_sample = (valid or [])[:256]
    meta = {"base_model_dir": str(base_dir), "config": config.to_dict(), "train_examples": len(train), "valid_examples": len(valid or [])}

    step, trained_tokens, history = 0, 0, []
    resume = latest_checkpoint(out_dir)
    if resume is not None:
        state = trainer.load_resume(resume)
        if state.get("config") != config.to_dict():
            raise InvalidRequestError("the run's saved state was made with other hyperparameters; cannot resume it.", "hyperparameters")
        step, trained_tokens, history = state["step"], state["trained_tokens"], state["history"]
    last_save = time.monotonic()
    metrics: dict = history[-1] if history else {}

    def resume_state():
        return {"step": step, "trained_tokens": trained_tokens, "history": history, "config": config.to_dict()}

    trainer.model.train()
    meta["compiled"] = should_compile(config, train) and step < total and trainer.compile()
    if meta["compiled"]:
        hooks.on_message("Compiling the model's layers before the first step (torch.compile; 15-45 s on 2 cores, then each step is faster).")
        epoch, i = divmod(step, steps_per_epoch)
        first = pack(_epoch_batches(train, config, epoch)[i], config.row_tokens)[0]
        stop = _warm_up(trainer, first, pack(valid_sample, config.row_tokens)[0] if valid_sample else None, hooks)
        if stop:
            return TuneResult(None, stop, trained_tokens, step, metrics)
    while step < total:
        epoch, i = divmod(step, steps_per_epoch)
        batch = _epoch_batches(train, config, epoch)[i]
        for g in trainer.opt.param_groups:
            g["lr"] = trainer.lr_at(step, total)
        n_loss = sum(ex.n_loss_tokens for ex in batch)
        loss_sum, right = 0.0, 0
        for row in pack(batch, config.row_tokens):
            loss, _, c = trainer.row_loss(row)
            (loss / n_loss).backward()  # the step's loss is the mean over all its learned tokens
            loss_sum, right = loss_sum + loss.item(), right + c
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainer.params, 1.0))
        # Checked before anything is saved: no checkpoint or adapter holds an inf or a NaN.
        if not math.isfinite(loss_sum):
            raise _diverged(step + 1, f"the training loss became non-finite ({loss_sum / n_loss})", config)
        if not math.isfinite(grad_norm):
            raise _diverged(step + 1, f"the gradient norm became non-finite ({grad_norm})", config)
        trainer.opt.step()
        if not trainer.weights_finite():
            raise _diverged(step + 1, "the adapter's weights became non-finite in the optimizer's update", config)
        trainer.opt.zero_grad(set_to_none=True)
        step += 1
        trained_tokens += sum(ex.n_tokens for ex in batch)
        metrics = {"step": step, "train_loss": loss_sum / n_loss, "train_mean_token_accuracy": right / n_loss, "tokens": trained_tokens, "learning_rate": trainer.lr_at(step - 1, total)}
        if valid_sample and (step % eval_every == 0 or step == total):
            metrics["valid_loss"], metrics["valid_mean_token_accuracy"] = trainer.evaluate(valid_sample)
        history.append(metrics)
        if step % steps_per_epoch == 0 or step == total:
            ckpt = out_dir / "checkpoints" / f"step-{step}"
            trainer.save_adapter(ckpt, {**meta, "step": step, "metrics": metrics})
            hooks.on_checkpoint(step, ckpt)
        hooks.on_step(step, total, dict(metrics))
        stop = hooks.should_stop() if step < total else None
        if stop == "pause" or (step < total and time.monotonic() - last_save >= RESUME_EVERY_S):
            trainer.save_resume(out_dir, resume_state())
            last_save = time.monotonic()
        if stop in ("cancel", "pause"):
            return TuneResult(None, stop, trained_tokens, step, metrics)

    if valid and len(valid) > len(valid_sample):
        metrics["full_valid_loss"], metrics["full_valid_mean_token_accuracy"] = trainer.evaluate(valid)
    elif valid:
        metrics["full_valid_loss"], metrics["full_valid_mean_token_accuracy"] = metrics["valid_loss"], metrics["valid_mean_token_accuracy"]
    final = out_dir / "adapter"
    trainer.save_adapter(final, {**meta, "steps": step, "trained_tokens": trained_tokens, "metrics": metrics})
    (out_dir / "metrics.json").write_text(json.dumps(history))
    shutil.rmtree(out_dir / "resume", ignore_errors=True)
    return TuneResult(final, None, trained_tokens, step, metrics)
