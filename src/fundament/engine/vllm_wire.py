"""vLLM's OpenAI wire format as fundament's: grammars as `structured_outputs`, vLLM's errors as
fundament's, a streamed completion choice as EngineOutputs. Pure functions; engine/vllm.py
does the HTTP."""

from __future__ import annotations

import json
from typing import Any

import httpx

from ..errors import (
    ContextLengthExceededError,
    FundamentError,
    InvalidRequestError,
    NotFoundError,
    QueueFullError,
    ServiceUnavailableError,
)
from .request import LOGPROB_FLOOR, EngineOutput


def structured_outputs(grammar: str) -> dict:
    """vLLM's `structured_outputs` for one of fundament's llguidance grammars: a JSON schema as
    `json` (its x-guidance settings inside, so the guidance backend compiles the same grammar),
    Lark (regex, choice, tools) as `grammar`."""
    if grammar.lstrip().startswith("{"):
        spec = json.loads(grammar)["grammars"][0]
        if spec.get("json_schema") is not None:
            return {"json": spec["json_schema"]}
        return {"grammar": spec["lark_grammar"]}
    return {"grammar": grammar}


def backend_error(status: int, body: Any, model: str) -> FundamentError:
    """vLLM's error response as fundament's error of the same kind (one OpenAI envelope)."""
    err = body.get("error", body) if isinstance(body, dict) else {}
    message = (err.get("message") if isinstance(err, dict) else None) or str(body)[:500]
    param = err.get("param") if isinstance(err, dict) else None
    if status == 400 and "maximum context length" in message:
        return ContextLengthExceededError(message, param)
    if status in (400, 422):
        return InvalidRequestError(f"vLLM refused the request: {message}", param)
    if status == 404:
        return NotFoundError(f"vLLM: {message}", param)
    if status == 429:
        return QueueFullError(f"vLLM is busy: {message}")
    return ServiceUnavailableError(f"model '{model}': its vLLM backend failed ({status}): {message}")


def chunk_outputs(choice: dict, k: int | None) -> list[EngineOutput]:
    """One streamed choice as one EngineOutput per token; the finish reason on the last."""
    ids = choice.get("token_ids") or []
    lp = choice.get("logprobs") or {}
    lps, tops = lp.get("token_logprobs") or [], lp.get("top_logprobs") or []
    outs = []
    for j, tid in enumerate(ids):
        out = EngineOutput(int(tid))
        if k is not None:
            out.logprob = _finite(lps[j]) if j < len(lps) else None
            if k and j < len(tops) and tops[j]:
                ranked = sorted(
                    ((int(t.split(":", 1)[1]), float(v)) for t, v in tops[j].items() if v is not None and v > -1e30),
                    key=lambda x: -x[1],
                )
                out.top_logprobs = [(t, max(v, LOGPROB_FLOOR)) for t, v in ranked[:k]]
            elif k:
                out.top_logprobs = []
        outs.append(out)
    finish = choice.get("finish_reason")
    if finish is not None:
        if finish not in ("stop", "length"):
            raise ServiceUnavailableError(f"vLLM ended the sequence with finish_reason {finish!r}")
        if not outs:  # a finish with no token of its own: vLLM stopped without emitting one
            raise ServiceUnavailableError("vLLM ended a sequence without a final token")
        outs[-1].finish_reason = finish
    return outs


def _finite(v) -> float:
    return LOGPROB_FLOOR if v is None or v < LOGPROB_FLOOR else float(v)


def json_body(r: httpx.Response) -> Any:
    try:
        return r.json()
    except ValueError:
        return {"message": r.text[:500]}


def error_message(r: httpx.Response) -> str:
    body = json_body(r)
    err = body.get("error", body) if isinstance(body, dict) else body
    return err.get("message", str(err)) if isinstance(err, dict) else str(err)
