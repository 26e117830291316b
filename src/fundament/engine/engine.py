"""The engine loop: continuous (iteration-level) batching over one model, on its own thread.

Every step the scheduler admits waiting requests while the KV budget allows, then runs one forward
pass over a flat batch holding one token per decoding sequence plus chunks of prompts being
prefilled, then samples one token per row that needs one. Requests join and leave at every step.
A scoring request (`Engine.score`) prefills a prompt and its continuations as one token tree and
returns their log-likelihoods instead of generating.
Knows token ids, sampling parameters and the model; knows nothing of text, HTTP or chat templates.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
from collections import deque
from collections.abc import AsyncGenerator, Callable

import torch

from ..config import EngineConfig
from ..errors import (
    ContextLengthExceededError,
    ModelNotFoundError,
    NotFoundError,
    QueueFullError,
    ServiceUnavailableError,
)
from ..models.llama import LlamaModel, Segment
from ..models.transformers_model import TransformersModel
from .batch import build_step
from .outbox import LoopDelivery, Outbox
from .prefix import PrefixCache
from .request import LOGPROB_FLOOR, EngineOutput, EngineRequest, ScoreOutput, check_context
from .sampling import SamplingParams, sample_row
from .tree import TokenTree

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, model: LlamaModel | TransformersModel, config: EngineConfig, eos_token_ids: list[int]):
        self.model, self.config = model, config
        self.eos_token_ids = set(eos_token_ids)
        self.max_context = model.cfg.max_position_embeddings
        self.waiting: deque[EngineRequest] = deque()
        self.running: list[EngineRequest] = []
        self._aborts: set[str] = set()
        self._pending_removals: list[int] = []
        self._reserved = 0
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.outbox = Outbox()  # a step's outputs are gathered while it samples, delivered at its end
        self.adapters: dict[str, int] = {}  # adapter name -> slot in the model
        self._slots = itertools.count()
        # Prompts' keys and values for reuse, where reusing them is exact (see engine/prefix.py).
        self.prefix = (
            PrefixCache(config.prefix_cache_tokens)
            if config.prefix_cache_tokens > 0 and getattr(model, "rows_alone", False)
            else None
        )
        self._adapter_loads = itertools.count()  # an adapter loaded again gets a new prefix-cache key
        self._prefix_keys: dict[str | None, str] = {None: "base"}

    # ---- public API (any thread) -------------------------------------------------------------

    @property
    def reserved_tokens(self) -> int:
        """KV cache tokens held for running sequences (0 when idle: nothing leaked)."""
        return self._reserved

    def health(self) -> dict:
        """What /health shows of this engine."""
        return {
            "backend": "fundament",
            "path": self.model.kind,  # "native" (fundament's engine) or "transformers" (the fallback)
            **({"path_reason": self.model.reason} if isinstance(self.model, TransformersModel) else {}),
            "running": len(self.running),
            "waiting": len(self.waiting),
            "steps": self.steps,
            "kv_reserved_tokens": self.reserved_tokens,
            "native_decode": self.model.native,
            "prefix_cache": None
            if self.prefix is None
            else {
                "tokens": self.prefix.tokens,
                "max_tokens": self.prefix.max_tokens,
                "queried_tokens": self.prefix.queries,
                "hit_tokens": self.prefix.hits,
            },
        }

    def check_fits(self, n_prompt: int, max_tokens: int) -> None:
        """ContextLengthExceededError (its `param` left to the caller, who knows the request's
        field names) if a prompt and its completion cannot fit the context or the KV cache."""
        total = check_context(self.max_context, n_prompt, max_tokens)
        if total > self.config.kv_cache_tokens:
            raise ContextLengthExceededError(
                f"The request needs {total} tokens of KV cache but the engine holds at most "
                f"{self.config.kv_cache_tokens} (engine.kv_cache_tokens)."
            )

    def load_adapter(self, name: str, path) -> None:
        """Make a PEFT LoRA directory servable as `name`; requests may name it at once."""
        with self._cv:
            slot = self.adapters.get(name)
            if slot is None:
                slot = next(self._slots)
            self.model.add_adapter(slot, path)
            self.adapters[name] = slot
            self._prefix_keys[name] = f"{name}#{next(self._adapter_loads)}"  # its old prompts' keys no longer match

    def remove_adapter(self, name: str) -> None:
        """Unload an adapter; its queued and running requests are failed first."""
        with self._cv:
            slot = self.adapters.pop(name, None)
            if slot is None:
                return
            for req in [*self.waiting, *self.running]:
                if req.adapter == name:
                    self._aborts.add(req.request_id)
                    req.on_output(NotFoundError(f"the model '{name}' was deleted while this request ran", "model"))
            self._pending_removals.append(slot)
            self._prefix_keys.pop(name, None)
            self._cv.notify()

    def submit(self, req: EngineRequest) -> None:
        if req.adapter is not None and req.adapter not in self.adapters:
            raise ModelNotFoundError(req.adapter)
        with self._cv:
            if len(self.waiting) >= self.config.max_queue:
                raise QueueFullError(
                    f"The server is busy: {len(self.waiting)} requests are already waiting. Retry shortly."
                )
            self.waiting.append(req)
            self._cv.notify()

    def abort(self, request_id: str) -> None:
        with self._cv:
            self._aborts.add(request_id)
            self._cv.notify()

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None
    ) -> AsyncGenerator[EngineOutput, None]:
        """Submit one sequence and yield its outputs; closing the iterator aborts the request."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        req = EngineRequest(list(prompt_ids), params, LoopDelivery(loop, queue.put_nowait), adapter=adapter)
        self.submit(req)
        done = False
        try:
            while True:
                out = await queue.get()
                if isinstance(out, BaseException):
                    done = True
                    raise out
                done = out.finish_reason is not None
                yield out
                if done:
                    return
        finally:
            if not done:
                self.abort(req.request_id)

    async def score(
        self, prompt_ids: list[int], continuations: list[list[int]], adapter: str | None = None
    ) -> list[list[float]]:
        """log P(token | prompt, the continuation's earlier tokens) for every token of every
        continuation, from one request: the prompt is prefilled once and a prefix that several
        continuations share is computed once. Cancelling the call aborts the request."""
        tree = TokenTree(list(prompt_ids), [list(c) for c in continuations])
        self.check_fits(tree.depth, 0)
        if len(tree) > self.config.kv_cache_tokens:
            raise ContextLengthExceededError(
                f"Scoring needs {len(tree)} tokens of KV cache (the prompt and every continuation) but the engine "
                f"holds at most {self.config.kv_cache_tokens} (engine.kv_cache_tokens). Score fewer or shorter continuations."
            )
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def deliver(out):
            if not done.done():
                done.set_exception(out) if isinstance(out, BaseException) else done.set_result(out)

        req = EngineRequest(
            list(prompt_ids),
            SamplingParams(max_tokens=0),
            LoopDelivery(loop, deliver),
            adapter=adapter,
            tree=tree,
        )
        self.submit(req)
        try:
            return (await done).logprobs
        finally:
            if not done.done():
                self.abort(req.request_id)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="fundament-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        # Whatever was still queued or running is failed, so no caller waits for an engine that is gone.
        with self._cv:
            pending, self.waiting, self.running = [*self.running, *self.waiting], deque(), []
        for req in pending:
            self._fail(req, ServiceUnavailableError("The server is shutting down; this request was stopped. Retry it."))

    # ---- the engine thread ---------------------------------------------------------------

    def _loop(self) -> None:
        # The engine thread owns the CPU's OpenMP pool. If another thread of the process had made a
        # multi-threaded pool too, libgomp would see more threads than cores and stop spinning,
        # doubling the cost of every small decode kernel (measured: int8 GEMV 24us -> 53us). So the
        # server keeps its other threads at one torch thread (see `reserve_cpu_for_engines`).
        torch.set_num_threads(self.config.threads or len(os.sched_getaffinity(0)))
        self._warm_up()
        while True:
            with self._cv:
                while (
                    not self._stop
                    and not self.waiting
                    and not self.running
                    and not self._aborts
                    and not self._pending_removals
                ):
                    self._cv.wait()
                if self._stop:
                    return
            try:
                self.step()
            except Exception as e:  # a fault of the batch as a whole (the forward pass): fail its requests
                log.exception("engine step failed")
                for req in self.running:
                    self._fail(req, e)
                self.running = []

    def _warm_up(self) -> None:
        """One short prompt and a few decode steps before the first request, on this thread: the
        first forward passes pay one-time costs (the OpenMP pool, kernel setup, first touches of
        memory) that would otherwise land on the first request (measured on the default model:
        its time to first token 0.11 s -> 0.07 s, its decode 158 -> 185 tokens/s)."""
        try:
            cache = self.model.new_cache(24)
            self.model.forward(torch.arange(1, 17), [Segment(cache, 0, 16)], torch.tensor([15]))
            for pos in range(16, 20):  # as generated tokens: the kernels decode steps take
                self.model.forward(torch.tensor([1]), [Segment(cache, pos, 1, generated=True)], torch.tensor([0]))
        except Exception:  # only an optimisation: the first request then pays instead
            log.exception("engine warm-up failed")

    def _release(self, req: EngineRequest) -> None:
        """Give back what a request holds: its KV cache and its reservation (once)."""
        if req.finished:
            return
        req.finished = True
        req.cache = None
        self._reserved -= req.reserved_tokens

    def _fail(self, req: EngineRequest, error: BaseException) -> None:
        """End one request with an error: its resources are released and its caller is told;
        the engine goes on serving the others."""
        if req.finished:
            return
        self._release(req)
        self.outbox.put_error(req, error)

    def _isolated(self, req: EngineRequest, work: Callable[..., object], *args) -> None:
        """Run one sequence's own work (admission, sampling, its logits processors, delivery):
        an exception there fails that request alone."""
        try:
            work(*args)
        except Exception as e:
            log.exception("request %s failed in the engine", req.request_id)
            self._fail(req, e)

    def _schedule(self) -> None:
        with self._cv:
            aborts, self._aborts = self._aborts, set()
            for slot in self._pending_removals:  # safe here: no forward pass is running
                self.model.remove_adapter(slot)
            self._pending_removals = []
            if aborts:
                self.waiting = deque(r for r in self.waiting if r.request_id not in aborts)
            while self.waiting and len(self.running) < self.config.max_num_seqs:
                req = min(self.waiting, key=lambda r: r.params.priority)  # the first of the most urgent
                need = req.kv_tokens
                if self._reserved + need > self.config.kv_cache_tokens:
                    break  # memory is full: it waits until a running sequence finishes
                self.waiting.remove(req)
                req.reserved_tokens = need
                self._reserved += need
                self._isolated(req, self._admit, req)
                if not req.finished:
                    self.running.append(req)
        if aborts:
            for req in [r for r in self.running if r.request_id in aborts]:
                self._release(req)
            self.running = [r for r in self.running if not r.finished]

    def _admit(self, req: EngineRequest) -> None:
        """A request's own state, made as it starts running (its reservation is already counted)."""
        req.cache = self.model.new_cache(req.reserved_tokens)
        if req.params.seed is not None:
            req.generator = torch.Generator().manual_seed(req.params.seed)
        req.processors = req.params.processors(req.prompt_ids)
        if self.prefix is not None and req.tree is None:
            req.prefix_key = self._prefix_keys.get(req.adapter)
            # prompt_logprobs needs every prompt row's logits: it computes them all
            if req.prefix_key is not None and not req.params.prompt_logprobs:
                req.num_computed = self.prefix.load(req.prefix_key, req.prompt_ids, req.cache)

    @torch.inference_mode()
    def step(self) -> None:
        self._schedule()
        if not self.running:
            return
        batch = build_step(self.running, self.config.max_num_batched_tokens, self.adapters)
        if batch is None:
            return
        n_sampled = batch.n_sampled
        logits = self.model.forward(
            torch.tensor(batch.tokens), batch.segments, torch.tensor(batch.rows, dtype=torch.long), n_sampled
        )
        self.steps += 1
        # The sampled rows come first, one per request: their greedy choices in one call, not one
        # call a row (each row's argmax is the same either way: the first of its largest logits).
        # (None sampled, as in a scoring-only step: its logits may have no columns at all.)
        best = logits[:n_sampled].argmax(dim=-1).tolist() if n_sampled else []
        with self.outbox.gathering(self._fail):
            for e in batch.entries:
                at, count = e.read_at, e.read_count
                choice = best[at] if at < n_sampled and count == 1 else None
                self._isolated(e.req, self._advance, e.req, logits[at : at + count], e.length, choice)
        self.running = [r for r in self.running if not r.finished]

    def _advance(self, req: EngineRequest, mine: torch.Tensor, n: int, best: int | None = None) -> None:
        """One request's share of a step: its n tokens were computed, `mine` are its logit rows
        (`best`: the argmax of the last, where the step took it)."""
        if req.tree is not None:
            self._record_scores(req, req.tree, mine, n)
            return
        if req.params.prompt_logprobs and req.num_computed < len(req.prompt_ids):
            req.record_prompt_logprobs(mine, n)
        req.num_computed += n
        if req.num_computed < len(req.prompt_ids):
            return  # more prompt to prefill
        if self.prefix is not None and req.prefix_key is not None and req.num_computed == len(req.prompt_ids):
            assert req.cache is not None
            self.prefix.store(req.prefix_key, req.prompt_ids, req.cache)
        self._sample(req, mine[-1], best)

    def _record_scores(self, req: EngineRequest, tree: TokenTree, logits: torch.Tensor, n: int) -> None:
        if logits.shape[0]:
            lp = torch.log_softmax(logits, dim=-1)  # (rows read, V)
            for j, r in enumerate(tree.read_rows(req.num_computed, n)):
                tree.record(r, lp[j])
        req.num_computed += n
        if req.num_computed == len(tree):
            self._release(req)
            self.outbox.put(req, ScoreOutput(tree.results()))

    def _sample(self, req: EngineRequest, logits: torch.Tensor, best: int | None = None) -> None:
        for proc in req.processors:
            logits = proc(req.output_ids, logits)
        plain_greedy = req.params.greedy and not req.processors
        token = best if best is not None and plain_greedy else sample_row(logits, req.params, req.generator)
        out = EngineOutput(token_id=token)
        if req.params.logprobs is not None:
            # From the distribution the token was drawn from: after logit_bias, penalties and a
            # grammar's mask, before temperature and top_p. A token the grammar forbids has
            # probability 0: it is never listed among the top ones (JSON has no -inf), and a chosen
            # token at -inf (only if every token was masked) reads as OpenAI's floor, -9999.
            lp = torch.log_softmax(logits, dim=-1)
            chosen = float(lp[token])
            out.logprob = chosen if chosen > LOGPROB_FLOOR else LOGPROB_FLOOR  # also NaN (a broken model) -> the floor
            k = req.params.logprobs
            if k > 0:
                top = torch.topk(lp, k)
                out.top_logprobs = [
                    (t, v) for t, v in zip(top.indices.tolist(), top.values.tolist()) if v > float("-inf")
                ]
        if not req.output_ids and req.params.prompt_logprobs:
            out.prompt_logprobs = req.prompt_logprobs
        req.output_ids.append(token)
        if token in req.params.stop_token_ids or (token in self.eos_token_ids and not req.params.ignore_eos):
            out.finish_reason = "stop"
        elif len(req.output_ids) >= req.params.max_tokens or req.num_computed + 1 >= self.max_context:
            out.finish_reason = "length"
        if out.finish_reason:
            self._release(req)
        self.outbox.put(req, out)


def reserve_cpu_for_engines() -> None:
    """Call first thing in a process that runs engine threads: the calling thread (and the threads
    it starts, which inherit the setting) do their torch work single-threaded, so each engine
    thread's OpenMP pool is the only one."""
    torch.set_num_threads(1)
