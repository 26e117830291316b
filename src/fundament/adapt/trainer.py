"""The trainer: a base model with LoRA layers on the device it is given (wrapped in DDP or sharded
with FSDP when it is one rank of several), the loss over a packed row, evaluation, the learning rate
schedule, torch.compile (and compiling before the first step without blocking a stop), and saving
adapters and resume state atomically. Knows nothing of jobs, epochs or hooks.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import cast

import torch

from ..errors import InvalidRequestError
from .examples import IGNORE, Example
from .hyperparameters import ALL_LINEAR, TuneConfig
from .packed_attention import PACKED_ATTENTION, packed_layout, register_packed_attention
from .parallel import Parallel, supports_bf16

# compile "auto": compile the decoder layers when the run trains at least this many tokens. The
# compilation costs 15-45 s on 2 cores, and the compiled steps are ~1.25x faster: below this,
# it would not pay for itself.
COMPILE_MIN_TOKENS = 50_000


def _row_tensors(row: list[Example], device: torch.device):
    ids = torch.tensor([t for ex in row for t in ex.input_ids], device=device).unsqueeze(0)  # (1, T)
    labels = torch.tensor([t for ex in row for t in ex.labels], device=device)  # (T,)
    # positions restart at 0 for each example (rotary positions); attention keeps examples apart
    pos = torch.tensor([p for ex in row for p in range(ex.n_tokens)], device=device).unsqueeze(0)  # (1, T)
    return ids, labels, pos


class RowModel(torch.nn.Module):
    """The decoder body and the vocabulary head as one module: the unit DDP wraps and FSDP shards
    (a row's logits are taken at its labelled positions only, so the model's own forward, which
    projects every position, is not the one trained)."""

    def __init__(self, body: torch.nn.Module, head: torch.nn.Module, softcap: float | None = None):
        super().__init__()
        self.body, self.head, self.softcap = body, head, softcap

    def forward(self, ids, pos, packed, where):  # ids, pos (1, T); where (N,) -> logits (N, V)
        hidden = self.body(input_ids=ids, position_ids=pos, use_cache=False, packed=packed).last_hidden_state[0]
        logits = self.head(hidden[where])
        if self.softcap:  # Gemma 2/3: the model's own forward caps its logits so; so must training
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def decoder_blocks(body: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder's list of layers, whatever the architecture calls it (`layers`, GPT-2's `h`)."""
    return next(m for m in body.modules() if isinstance(m, torch.nn.ModuleList))


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


# Where a model stores projections fused (Phi-3: qkv_proj, gate_up_proj), a target names the module
# holding it: adapting q_proj there adapts the whole of qkv_proj.
FUSED_MODULES = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
}


def stored_targets(model, targets) -> list[str] | str:
    """The model's own module names for the LoRA targets (the Llama names fundament's API takes).
    An architecture with names of its own (GPT-2's `c_attn`, OPT's `fc1`): the default (every
    projection) adapts every linear layer of its decoder (PEFT's "all-linear"), as on Llama; a
    narrower list keeps the names the model has, and one naming none of them is refused."""
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    stored = {t if t in present else FUSED_MODULES.get(t, t) for t in targets}
    if stored <= present:
        return sorted(stored)
    if set(targets) >= set(ALL_LINEAR):
        return "all-linear"
    if stored & present:
        return sorted(stored & present)
    raise InvalidRequestError(
        f"target_modules {sorted(targets)} name no module of this {model.config.model_type} model; "
        f"leave target_modules out to adapt all its linear layers",
        "target_modules",
    )


def check_targets(base_dir: Path, targets: list[str]) -> None:
    """Refuse LoRA targets that name no module of the model in base_dir, as the trainer would, but
    before a job exists: the model is built on the meta device, no weights read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(base_dir)))
    stored_targets(model, targets)


class Trainer:
    def __init__(
        self,
        base_dir: Path,
        config: TuneConfig,
        bf16: bool | None = None,
        device: str | torch.device | None = None,
        parallel: Parallel | None = None,
    ):
        """`device`: where to train (default: the rank's GPU where there is one, else the CPU);
        `bf16`: autocast to bfloat16 (default: where the device has fast bf16 matmuls)."""
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        _wait_for_compiles()
        self.config = config
        self.parallel = parallel or Parallel()
        self.device = torch.device(device) if device is not None else self.parallel.device
        torch.manual_seed(config.seed)  # the same LoRA initialisation on every rank
        try:
            base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32, attn_implementation="sdpa")
        except ValueError:  # no SDPA in its transformers code (Gemma 2): packed attention replaces it anyway
            base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32, attn_implementation="eager")
        base.to(self.device)  # type: ignore[arg-type]  # transformers types .to() narrower than torch
        self.max_len = base.config.max_position_embeddings
        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=stored_targets(base, config.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        register_packed_attention()
        base.config._attn_implementation = PACKED_ATTENTION
        self.model = get_peft_model(base, lora)
        # bf16 matmuls where the device has them (AVX512-BF16/AMX, Ampere+); fp32 LoRA weights and loss.
        self.autocast = supports_bf16(self.device) if bf16 is None else bf16
        # PEFT put the LoRA layers into `base` in place (self.model.base_model.model is base).
        self.body, self.head = base.get_decoder(), base.get_output_embeddings()
        self.net = RowModel(self.body, self.head, getattr(base.config, "final_logit_softcapping", None))
        self.sharded = self.parallel.distributed and self.parallel.strategy == "fsdp"
        self.compiled = False
        if self.autocast and not self.sharded:  # FSDP casts by its own mixed-precision policy instead
            self._frozen_to_bf16()
        self.wrapped: torch.nn.Module = self.net
        if self.sharded:
            self._shard()
        elif self.parallel.distributed:
            from torch.nn.parallel import DistributedDataParallel

            # No buffers to broadcast (rotary tables are computed alike everywhere): each forward
            # stays free of collectives, and gradients are all-reduced once per step.
            self.wrapped = DistributedDataParallel(
                self.net,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False,
            )
        self.params = [p for p in self.net.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=config.weight_decay)

    def _shard(self) -> None:
        """FSDP (fully_shard): each decoder layer a unit of its own, the embeddings, norm and head
        the root's. Parameters, gradients and optimizer state are split over the ranks and each
        layer is gathered only for its forward and backward. bf16 compute where the device has it,
        gradients reduced in fp32."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if self.autocast else None, reduce_dtype=torch.float32)
        for layer in decoder_blocks(self.body):
            fully_shard(layer, mp_policy=policy)
        fully_shard(self.net, mp_policy=policy)

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
        for layer in decoder_blocks(self.body):
            layer.compile(dynamic=True)
        self.compiled = True
        return True

    def row_loss(self, row: list[Example]) -> tuple[torch.Tensor, int, int]:
        """Summed cross-entropy over the row's learned tokens, their count, and how many the model
        predicts right. Logits only where there are labels: the vocabulary projection is a fifth
        of a small model's compute and most positions carry no loss."""
        ids, labels, pos = _row_tensors(row, self.device)
        take, slots, S, L = packed_layout([ex.n_tokens for ex in row])
        packed = (take.to(self.device), slots.to(self.device), S, L)
        where = (labels != IGNORE).nonzero().squeeze(1)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.wrapped(ids, pos, packed, where).float()  # (N, V)
        target = labels[where]
        loss = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
        correct = int((logits.argmax(-1) == target).sum())
        return loss, len(where), correct

    def accumulating(self, last: bool):
        """The context of one row's forward and backward in a step: with several ranks, gradients
        are all-reduced (DDP) or reduce-scattered (FSDP) on the step's last row only."""
        import contextlib

        if self.sharded:
            self.wrapped.set_requires_gradient_sync(last)  # type: ignore[operator]
        elif self.parallel.distributed and not last:
            return self.wrapped.no_sync()  # type: ignore[operator]
        return contextlib.nullcontext()

    def clip_grads(self, max_norm: float) -> float:
        """Clip the gradients' global norm (over every rank's shard) to max_norm; the norm before."""
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    @torch.no_grad()
    def evaluate(self, examples: list[Example]) -> tuple[float, float]:
        """Mean loss and token accuracy over `examples` (every rank its share, summed)."""
        self.model.eval()
        total, n, right = 0.0, 0.0, 0.0
        for row, weight in self.parallel.rows(examples, self.config.row_tokens):
            loss, k, c = self.row_loss(row)
            total, n, right = total + weight * float(loss), n + weight * k, right + weight * c
        self.model.train()
        total, n, right = self.parallel.sum([total, n, right])
        return total / max(n, 1), right / max(n, 1)

    def lr_at(self, step: int, total: int) -> float:
        """Linear warm-up, then linear decay to zero."""
        warm = max(1, int(total * self.config.warmup_ratio))
        if step < warm:
            return self.config.learning_rate * (step + 1) / warm
        return self.config.learning_rate * max(0.0, (total - step) / max(1, total - warm))

    @torch.no_grad()
    def weights_finite(self) -> bool:
        """Whether every trained weight is finite (one flag per tensor, one sync; every rank's shard)."""
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self.params]
        ok = bool(torch.stack([p.isfinite().all() for p in local]).all())
        return self.parallel.sum([float(not ok)])[0] == 0 if self.sharded else ok

    def _full_state(self) -> tuple[dict, dict]:
        """The trained weights (keyed by RowModel's names) and the optimizer state, whole: gathered
        from every rank's shard onto rank 0 (a collective every rank joins; the others get {})."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        if not self.sharded:  # already whole on every rank
            opts = StateDictOptions(ignore_frozen_params=True)
        weights = cast(dict[str, torch.Tensor], get_model_state_dict(self.wrapped, options=opts))
        return {k: v.detach().cpu().clone() for k, v in weights.items()}, get_optimizer_state_dict(
            self.wrapped, self.opt, options=opts
        )

    def _model_keyed(self) -> dict:
        """The trained weights (whole, on rank 0) under the PEFT model's own names."""
        weights, _ = self._full_state()
        prefix = next(name for name, m in self.model.named_modules() if m is self.body) + "."
        return {prefix + k.removeprefix("body."): v for k, v in weights.items() if k.startswith("body.")}

    def adapter_state(self) -> dict:
        """The adapter's weights under the names PEFT saves them with (whole, on rank 0)."""
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.model, state_dict=self._model_keyed())

    def save_adapter(self, dest: Path, extra: dict) -> None:
        """A PEFT directory at dest, written by rank 0 alone (every rank calls this: with FSDP the
        weights are gathered from all of them first)."""
        gathered = self._model_keyed() if self.sharded else None

        def write(tmp: Path):
            if gathered is None:
                self.model.save_pretrained(str(tmp))
            else:
                self.model.save_pretrained(str(tmp), state_dict=gathered)
            (tmp / "fundament_tune.json").write_text(json.dumps(extra, indent=2, default=str))

        if self.parallel.is_main:
            _save_dir_atomically(dest, write)
        self.parallel.barrier()  # no rank goes on (and may be killed) before the checkpoint is whole

    def save_resume(self, out_dir: Path, state: dict) -> None:
        """The weights and optimizer state, whole (so a run resumes on any number of ranks), written
        by rank 0 alone into out_dir/resume, atomically: a kill mid-write leaves the last one."""
        weights, optimizer = self._full_state()

        def write(tmp: Path):
            torch.save({"weights": weights, "optimizer": optimizer, **state}, tmp / "state.pt")

        if self.parallel.is_main:
            _save_dir_atomically(out_dir / "resume", write)
        self.parallel.barrier()

    def load_resume(self, path: Path) -> dict:
        """Every rank reads the whole state and keeps its part."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        state = torch.load(path / "state.pt", weights_only=False, map_location="cpu")
        if "adapter" in state and not self.parallel.distributed:  # saved by a version before ranks
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.model, state.pop("adapter"))
            self.opt.load_state_dict(state.pop("optimizer"))
            return state
        opts = StateDictOptions(full_state_dict=self.sharded, strict=False)
        set_model_state_dict(self.wrapped, state.pop("weights"), options=opts)
        set_optimizer_state_dict(self.wrapped, self.opt, state.pop("optimizer"), options=opts)
        return state


def should_compile(config: TuneConfig, train: list[Example], distributed: bool = False) -> bool:
    """Compile "auto": long one-process runs. A run of several ranks trains eagerly (a compile per
    rank would cost each rank's core the same 15-45 s, and stop requests could not be heard)."""
    if distributed:
        return False
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
