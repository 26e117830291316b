"""POST /v1/embeddings: strings or token arrays in, float or base64 vectors out."""

from __future__ import annotations

import asyncio
import base64

import numpy as np

from ..errors import InvalidRequestError
from ..registry import ModelRegistry
from .protocol import MAX_INPUTS, CreateEmbeddingResponse, Embedding, EmbeddingRequest, EmbeddingUsage

SLICE = 256  # inputs embedded per thread hand-off (a multiple of the encoder's batch of 32)


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
        inp = req.input
        if isinstance(inp, str):
            inp = [inp]
        if not inp:
            raise InvalidRequestError("input must not be empty.", "input")
        if len(inp) > MAX_INPUTS:
            raise InvalidRequestError(
                f"input has {len(inp)} items; at most {MAX_INPUTS} are allowed per request.", "input"
            )
        token_input = all(isinstance(x, int) for x in inp)
        if token_input:
            inp = [inp]
        for i, x in enumerate(inp):
            if (isinstance(x, str) and not x.strip()) or (isinstance(x, list) and not x):
                raise InvalidRequestError(f"input[{i}] is empty; every input must have some text or tokens.", "input")
        vecs, n_tokens = [], 0
        async with self._lock:
            # In slices, each awaited: a request cancelled (its client gone, or shutdown) stops
            # after the slice in progress instead of embedding all 2,048 inputs for nobody.
            for start in range(0, len(inp), SLICE):
                part = inp[start : start + SLICE]
                if isinstance(inp[0], str):
                    v, n = await asyncio.to_thread(self._embed_texts, em, part)
                else:
                    v, n = await asyncio.to_thread(em.embedder.embed_token_ids, part, start)
                vecs += v
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
    def _embed_texts(em, texts):
        if not all(isinstance(t, str) for t in texts):
            raise InvalidRequestError("input mixes strings and token arrays; send one kind.", "input")
        return em.embedder.embed_texts(texts)
