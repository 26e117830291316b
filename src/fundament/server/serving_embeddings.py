"""POST /v1/embeddings: strings or token arrays in, float or base64 vectors out."""

from __future__ import annotations

import asyncio
import base64
from typing import TYPE_CHECKING

import numpy as np

from ..errors import InvalidRequestError
from ..registry import ModelRegistry, ServedEmbedder
from .protocol import MAX_INPUTS, CreateEmbeddingResponse, Embedding, EmbeddingRequest, EmbeddingUsage

if TYPE_CHECKING:
    from typing_extensions import TypeIs

SLICE = 256  # inputs embedded per thread hand-off (a multiple of the encoder's batch of 32)


def _token_array(items: list[str] | list[int] | list[list[int]]) -> TypeIs[list[int]]:
    return all(isinstance(x, int) for x in items)


def _texts(items: list[str] | list[list[int]]) -> TypeIs[list[str]]:
    return all(isinstance(x, str) for x in items)


class EmbeddingHandler:
    def __init__(self, registry: ModelRegistry):
        self.registry = registry
        self._lock = asyncio.Lock()  # one batch at a time on the CPU; others queue here

    async def create(self, req: EmbeddingRequest) -> CreateEmbeddingResponse:
        em = self.registry.resolve_embedder(req.model)
        if req.dimensions is not None and req.dimensions != em.embedder.dimensions:
            raise InvalidRequestError(
                f"{em.name} produces {em.embedder.dimensions}-dimensional vectors and was not trained to be "
                f"truncated; omit dimensions or set it to {em.embedder.dimensions}.",
                "dimensions",
            )
        inp = [req.input] if isinstance(req.input, str) else req.input
        if not inp:
            raise InvalidRequestError("input must not be empty.", "input")
        if len(inp) > MAX_INPUTS:
            raise InvalidRequestError(
                f"input has {len(inp)} items; at most {MAX_INPUTS} are allowed per request.", "input"
            )
        batch: list[str] | list[list[int]] = [inp] if _token_array(inp) else inp  # one token array: one input
        for i, x in enumerate(batch):
            if (isinstance(x, str) and not x.strip()) or (isinstance(x, list) and not x):
                raise InvalidRequestError(f"input[{i}] is empty; every input must have some text or tokens.", "input")
        vecs: list[list[float]] = []
        n_tokens = 0
        async with self._lock:
            # In slices, each awaited: a request cancelled (its client gone, or shutdown) stops
            # after the slice in progress instead of embedding all 2,048 inputs for nobody.
            for start in range(0, len(batch), SLICE):
                part, n = await asyncio.to_thread(self._embed, em, batch[start : start + SLICE], start)
                vecs += part
                n_tokens += n
        data = []
        for i, v in enumerate(vecs):
            value = (
                base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode()
                if req.encoding_format == "base64"
                else v
            )
            data.append(Embedding(index=i, embedding=value))
        return CreateEmbeddingResponse(
            data=data, model=req.model, usage=EmbeddingUsage(prompt_tokens=n_tokens, total_tokens=n_tokens)
        )

    @staticmethod
    def _embed(em: ServedEmbedder, part: list[str] | list[list[int]], start: int) -> tuple[list[list[float]], int]:
        """Vectors and tokens for inputs start, start + 1, ... of the request."""
        if _texts(part):
            return em.embedder.embed_texts(part)
        if any(isinstance(x, str) for x in part):
            raise InvalidRequestError("input mixes strings and token arrays; send one kind.", "input")
        return em.embedder.embed_token_ids(part, start)
