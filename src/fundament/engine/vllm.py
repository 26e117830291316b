"""vLLM as fundament's engine: the `Engine` interface (generate, score, adapters) over a vLLM
OpenAI server, so chat templates, tools, stop strings, structured output, classification and the
`ft:` models all stay fundament's while vLLM does the forward passes.

Requests go to vLLM's /v1/completions as token ids and stream back token ids
(`return_token_ids`), so the tokens vLLM generates are the tokens fundament's own engine would
see. A grammar travels as `structured_outputs` (its llguidance form; the server must run the
guidance backend). Scoring (classification) asks for the log-probability of each continuation
token at a generated position (`logprob_token_ids`) rather than `prompt_logprobs`, which kills
vLLM 0.32's CPU engine when LoRA is enabled. Adapters are registered with vLLM's runtime LoRA
endpoints and registered again whenever the server comes back.
Knows token ids and vLLM's HTTP API; knows nothing of chat messages.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
from collections import deque
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import httpx

from ..config import EngineConfig, VLLMSpec
from ..errors import (
    FundamentError,
    InvalidRequestError,
    ModelNotFoundError,
    NotFoundError,
    QueueFullError,
    ServiceUnavailableError,
)
from .constraints import GrammarConstraint
from .request import LOGPROB_FLOOR, EngineOutput, check_context
from .sampling import SamplingParams
from .vllm_server import VLLMServer
from .vllm_wire import backend_error, chunk_outputs, error_message, json_body, structured_outputs

log = logging.getLogger(__name__)
logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request to vLLM is noise in the server log
_ids = itertools.count()
MAX_LOGPROB_TOKEN_IDS = 128  # vLLM 0.32's bound on logprob_token_ids in one request


class VLLMEngine:
    """One model on a vLLM server, started here (`VLLMServer`) or reached by URL."""

    kind = "vllm"

    def __init__(
        self,
        name: str,
        spec: VLLMSpec,
        config: EngineConfig,
        eos_token_ids: list[int],
        max_context: int,
        model_dir: Path,
    ):
        self.name, self.spec, self.config = name, spec, config
        self.eos_token_ids = set(eos_token_ids)
        self.max_context = spec.max_model_len or max_context
        self.server = None if spec.url else VLLMServer(name, model_dir, spec, on_ready=self._register_adapters)
        base = spec.url or self.server.url  # type: ignore[union-attr]
        self.url = base.rstrip("/").removesuffix("/v1")
        self.served_model = spec.served_model_name or (None if spec.url else name)
        self._discovered = False  # vLLM's model list read (its max_model_len)
        self.waiting: deque = deque()  # vLLM queues; nothing waits here
        self.running: dict[str, str | None] = {}  # request id -> adapter, while vLLM works on it
        self.steps = 0  # streamed chunks received (a step may carry several tokens)
        self.reserved_tokens = 0
        self.adapters: dict[str, str] = {}  # adapter name -> its directory, as vLLM must see it
        self._loaded: set[str] = set()  # adapters vLLM has now
        self._adapter_lock = threading.Lock()
        self._clients: dict[asyncio.AbstractEventLoop, httpx.AsyncClient] = {}
        headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
        self._headers = headers

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        if self.server is not None:
            self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        self._clients.clear()  # their connections close with the event loops that own them

    @property
    def ready(self) -> bool:
        return self.server is None or self.server.state == "ready"

    def health(self) -> dict:
        out: dict[str, Any] = {"backend": "vllm", "url": self.url, "running": len(self.running), "waiting": 0}
        out["adapters"] = sorted(self._loaded)
        if self.server is not None:
            out.update(state=self.server.state, pid=self.server.pid, restarts=self.server.restarts)
            out["log"] = str(self.server.log_path)
        return out

    def check_fits(self, n_prompt: int, max_tokens: int) -> None:
        check_context(self.max_context, n_prompt, max_tokens)  # vLLM holds its own KV cache

    # ---- adapters --------------------------------------------------------------------------

    def load_adapter(self, name: str, path) -> None:
        """Serve a PEFT LoRA directory as `name` through vLLM's runtime LoRA loading. Recorded
        even while vLLM is down: it is registered as soon as the server is back."""
        with self._adapter_lock:
            self.adapters[name] = str(Path(path).resolve())
            if self.ready:
                try:
                    self._register(name)
                except ServiceUnavailableError as e:  # registered on first use, or when it is back
                    log.warning("%s", e.message)

    def remove_adapter(self, name: str) -> None:
        with self._adapter_lock:
            self.adapters.pop(name, None)
            if name in self._loaded:
                self._loaded.discard(name)
                try:
                    r = httpx.post(self.url + "/v1/unload_lora_adapter", json={"lora_name": name}, **self._sync_kw())
                    if r.status_code >= 400 and r.status_code != 404:
                        log.warning("vLLM did not unload %s: %s", name, r.text[:300])
                except httpx.HTTPError as e:
                    log.warning("vLLM did not unload %s: %s", name, e)

    def _register_adapters(self) -> None:
        """After a (re)start: vLLM remembers no adapter, so every recorded one is loaded again."""
        with self._adapter_lock:
            self._loaded.clear()
            for name in list(self.adapters):
                try:
                    self._register(name)
                except FundamentError as e:
                    log.error("adapter %s could not be registered with vLLM: %s", name, e.message)

    def _register(self, name: str) -> None:
        body = {"lora_name": name, "lora_path": self.adapters[name]}
        try:
            r = httpx.post(self.url + "/v1/load_lora_adapter", json=body, **self._sync_kw())
        except httpx.HTTPError as e:
            raise ServiceUnavailableError(f"model '{name}': vLLM at {self.url} could not be reached: {e}") from e
        if r.status_code >= 400 and "already" not in r.text:
            self.adapters.pop(name, None)
            raise InvalidRequestError(f"vLLM could not load the adapter '{name}': {error_message(r)}", "model")
        self._loaded.add(name)
        log.info("vLLM at %s serves adapter %s", self.url, name)

    def _sync_kw(self) -> dict:
        return {"timeout": httpx.Timeout(self.spec.request_timeout_s, connect=5.0), "headers": self._headers}

    # ---- requests --------------------------------------------------------------------------

    def _client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            timeout = httpx.Timeout(self.spec.request_timeout_s, connect=5.0)
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
            client = httpx.AsyncClient(base_url=self.url, timeout=timeout, limits=limits, headers=self._headers)
            self._clients[loop] = client
        return client

    async def _model_for(self, adapter: str | None) -> str:
        if not self.ready:
            raise ServiceUnavailableError(
                f"model '{self.name}': its vLLM server {self.server.describe()}. Retry shortly."  # type: ignore[union-attr]
            )
        if adapter is not None:
            if adapter not in self.adapters:
                raise ModelNotFoundError(adapter)
            if adapter not in self._loaded:
                await asyncio.to_thread(self.load_adapter, adapter, self.adapters[adapter])
            return adapter
        if not self._discovered:
            found = await self._discover_model()
            self.served_model, self._discovered = self.served_model or found, True
        return self.served_model  # type: ignore[return-value]

    async def _discover_model(self) -> str:
        r = await self._send("GET", "/v1/models")
        models = [m for m in r.json().get("data", []) if not m.get("parent")]
        mine = [m for m in models if m["id"] == self.served_model] or models
        if not mine:
            raise ServiceUnavailableError(f"model '{self.name}': vLLM at {self.url} serves no model")
        if mine[0].get("max_model_len"):  # vLLM's own limit, where the config gave none
            self.max_context = min(self.max_context, int(mine[0]["max_model_len"]))
        return mine[0]["id"]

    def _unreachable(self, e: Exception) -> ServiceUnavailableError:
        if self.server is not None:
            self.server.check()
        if self.server is None:
            state = "its vLLM backend"
        elif self.ready:  # it died a moment ago: the supervisor restarts it
            state = f"its vLLM server (pid {self.server.pid}, restarted when it exits)"
        else:
            state = f"its vLLM server {self.server.describe()}"
        if isinstance(e, httpx.TimeoutException):
            return ServiceUnavailableError(
                f"model '{self.name}': {state} at {self.url} did not answer within "
                f"{self.spec.request_timeout_s:.0f} s (vllm.request_timeout_s). Retry shortly."
            )
        return ServiceUnavailableError(
            f"model '{self.name}': {state} at {self.url} is not reachable ({type(e).__name__}: {e}). Retry shortly."
        )

    async def _send(self, method: str, path: str, body: dict | None = None) -> httpx.Response:
        try:
            r = await self._client().request(method, path, json=body)
        except httpx.HTTPError as e:
            raise self._unreachable(e) from e
        if r.status_code >= 400:
            raise backend_error(r.status_code, json_body(r), self.name)
        return r

    def _body(self, prompt_ids: list[int], params: SamplingParams, model: str) -> dict:
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
        body: dict[str, Any] = {
            "model": model,
            "prompt": list(prompt_ids),
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stop_token_ids": sorted(stops),
            "ignore_eos": params.ignore_eos,
            "return_token_ids": True,
            "skip_special_tokens": False,
        }
        if params.top_k > 0:
            body["top_k"] = params.top_k
        if params.min_p > 0:
            body["min_p"] = params.min_p
        if params.repetition_penalty != 1.0:
            body["repetition_penalty"] = params.repetition_penalty
        if params.seed is not None:
            body["seed"] = params.seed
        if params.presence_penalty:
            body["presence_penalty"] = params.presence_penalty
        if params.frequency_penalty:
            body["frequency_penalty"] = params.frequency_penalty
        if params.logit_bias:
            body["logit_bias"] = {str(k): v for k, v in params.logit_bias.items()}
        if params.logprobs is not None:
            body["logprobs"] = params.logprobs
            body["return_tokens_as_token_ids"] = True
        grammars = [p for p in params.logits_processors if isinstance(p, GrammarConstraint)]
        if len(grammars) != len(params.logits_processors) or len(grammars) > 1:
            raise InvalidRequestError(
                f"model '{self.name}' is served by vLLM, which takes no custom logits processors."
            )
        if grammars:
            body["structured_outputs"] = structured_outputs(grammars[0].grammar)
        return body

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None
    ) -> AsyncGenerator[EngineOutput, None]:
        """Stream one sequence from vLLM as EngineOutputs, one per token; closing the iterator
        closes the connection, which aborts the request in vLLM."""
        model = await self._model_for(adapter)
        if len(self.running) >= self.config.max_num_seqs + self.config.max_queue:
            raise QueueFullError(f"The server is busy: {len(self.running)} requests are in flight. Retry shortly.")
        prompt_lp = None
        if params.prompt_logprobs:
            prompt_lp = await self._prompt_logprobs(prompt_ids, model)
        body = {**self._body(prompt_ids, params, model), "stream": True}
        rid = f"fvllm-{next(_ids)}"
        self.running[rid] = adapter
        last: EngineOutput | None = None
        r = None
        try:
            r = await self._open(body, adapter)
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise backend_error(int(chunk["error"].get("code") or 500), chunk, self.name)
                self.steps += 1
                for out in chunk_outputs(chunk["choices"][0], params.logprobs):
                    if prompt_lp is not None:
                        out.prompt_logprobs, prompt_lp = prompt_lp, None
                    last = out
                    yield out
                    if out.finish_reason:
                        return
            if last is None or last.finish_reason is None:
                raise ServiceUnavailableError(f"model '{self.name}': the vLLM stream ended before the sequence did.")
        except httpx.HTTPError as e:
            raise self._unreachable(e) from e
        finally:
            self.running.pop(rid, None)
            if r is not None:
                await r.aclose()  # mid-stream: vLLM sees the connection go and aborts the request

    async def _open(self, body: dict, adapter: str | None) -> httpx.Response:
        """POST a streamed completion; the response, its status checked. A vLLM that restarted
        without fundament (a remote one) has forgotten the adapters: a 404 for one registers it
        again and the request is sent once more."""
        client = self._client()
        for attempt in (0, 1):
            r = await client.send(client.build_request("POST", "/v1/completions", json=body), stream=True)
            if r.status_code < 400:
                return r
            await r.aread()
            await r.aclose()
            if r.status_code == 404 and adapter is not None and attempt == 0:
                with self._adapter_lock:
                    self._loaded.discard(adapter)
                await asyncio.to_thread(self.load_adapter, adapter, self.adapters.get(adapter, ""))
                continue
            break
        raise backend_error(r.status_code, json_body(r), self.name)

    async def _prompt_logprobs(self, prompt_ids: list[int], model: str) -> list[float | None]:
        """log P(token | earlier tokens) for each prompt token (None for the first)."""
        if len(prompt_ids) < 2:
            return [None] * len(prompt_ids)
        (lps,) = await self.score(prompt_ids[:1], [prompt_ids[1:]], None if model == self.served_model else model)
        return [None, *lps]

    async def score(
        self, prompt_ids: list[int], continuations: list[list[int]], adapter: str | None = None
    ) -> list[list[float]]:
        """log P(token | prompt, the continuation's earlier tokens) for every continuation token:
        one vLLM request with one prompt per token position (vLLM's prefix cache computes the
        shared prompt once)."""
        model = await self._model_for(adapter)
        # One prompt per distinct prefix: every label's first token is read off the same prompt,
        # and labels that begin alike share their later prefixes too.
        prefixes: dict[tuple[int, ...], int] = {}
        where: list[list[int]] = []  # per continuation token: the index of its prefix
        for c in continuations:
            where.append([prefixes.setdefault((*prompt_ids, *c[:j]), len(prefixes)) for j in range(len(c))])
        for p in prefixes:
            self.check_fits(len(p), 1)
        targets = sorted({t for c in continuations for t in c})
        try:
            table = await self._next_token_logprobs([list(p) for p in prefixes], targets, model) if prefixes else []
        except NotFoundError:
            if adapter is None:
                raise
            with self._adapter_lock:  # a restarted remote vLLM forgot it: register it once more
                self._loaded.discard(adapter)
            await asyncio.to_thread(self.load_adapter, adapter, self.adapters.get(adapter, ""))
            table = await self._next_token_logprobs([list(p) for p in prefixes], targets, model)
        return [[table[k][t] for k, t in zip(ks, c)] for ks, c in zip(where, continuations)]

    async def _next_token_logprobs(
        self, prefixes: list[list[int]], targets: list[int], model: str
    ) -> list[dict[int, float]]:
        """Per prefix, log P(t | prefix) for every t in targets, from the model's raw distribution
        (vLLM's `logprob_token_ids`): one request per 128 targets, vLLM's most."""
        out: list[dict[int, float]] = [{} for _ in prefixes]
        for i in range(0, len(targets), MAX_LOGPROB_TOKEN_IDS):
            chunk = targets[i : i + MAX_LOGPROB_TOKEN_IDS]
            body = {
                "model": model,
                "prompt": prefixes,
                "max_tokens": 1,
                "temperature": 0.0,
                "logprobs": 1,
                "logprob_token_ids": chunk,
                "return_tokens_as_token_ids": True,
            }
            rid = f"fvllm-{next(_ids)}"
            self.running[rid] = model
            try:
                r = await self._send("POST", "/v1/completions", body)
            finally:
                self.running.pop(rid, None)
            for choice in r.json()["choices"]:
                top = ((choice.get("logprobs") or {}).get("top_logprobs") or [{}])[0] or {}
                row = out[choice["index"]]
                for t in chunk:
                    lp = top.get(f"token_id:{t}")
                    if lp is None:
                        raise ServiceUnavailableError(
                            f"model '{self.name}': vLLM returned no log-probability for token {t}"
                        )
                    row[t] = max(float(lp), LOGPROB_FLOOR)
        return out
