"""The trainer: a base model with LoRA layers, the loss over a packed row, evaluation, the learning
rate schedule, torch.compile (and compiling before the first step without blocking a stop), and
saving adapters and resume state atomically. Knows nothing of jobs, epochs or hooks.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from .examples import IGNORE, Example, pack
from .hyperparameters import TuneConfig
from .packed_attention import PACKED_ATTENTION, packed_layout, register_packed_attention

# compile "auto": compile the decoder layers when the run trains at least this many tokens. The
# compilation costs 15-45 s on 2 cores, and the compiled steps are ~1.25x faster: below this,
# it would not pay for itself.
COMPILE_MIN_TOKENS = 50_000


def _row_tensors(row: list[Example]):
    ids = torch.tensor([t for ex in row for t in ex.input_ids]).unsqueeze(0)  # (1, T)
    labels = torch.tensor([t for ex in row for t in ex.labels])  # (T,)
    # positions restart at 0 for each example (rotary positions); attention keeps examples apart
    pos = torch.tensor([p for ex in row for p in range(ex.n_tokens)]).unsqueeze(0)  # (1, T)
    return ids, labels, pos


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


class Trainer:
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
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=list(config.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        register_packed_attention()
        base.config._attn_implementation = PACKED_ATTENTION
        self.model = get_peft_model(base, lora)
        # bf16 matmuls where the CPU has them (AVX512-BF16/AMX); fp32 LoRA weights and loss.
        self.autocast = cpu_supports_bf16() if bf16 is None else bf16
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=config.weight_decay)
        # PEFT put the LoRA layers into `base` in place (self.model.base_model.model is base).
        self.body, self.head = base.model, base.lm_head
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
                # torch types Module.__setattr__ as taking tensors and modules only; this is a plain flag
                m.cast_input_dtype_enabled = False  # type: ignore[assignment]

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
            packed = packed_layout([ex.n_tokens for ex in row])
            hidden = self.body(input_ids=ids, position_ids=pos, use_cache=False, packed=packed).last_hidden_state[
                0
            ]  # (T, C)
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


def warm_up(
    trainer: Trainer, row: list[Example], valid_row: list[Example] | None, should_stop: Callable[[], str | None]
) -> str | None:
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
            stop = should_stop()
            if stop:
                _COMPILING.append(t)
                return stop
    trainer.opt.zero_grad(set_to_none=True)  # the warm-up's gradients are not a step
    if failed:
        raise failed[0]
    return None
