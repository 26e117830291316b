"""POST /v1/classifications (our extension): labels with a probability each, by prompting."""

from __future__ import annotations

from ..adapt.classify import Classifier, PoolVectorCache, PromptOptions
from ..registry import ModelRegistry
from .protocol import Classification, ClassificationRequest, ClassificationResponse, Usage, new_id, now


class ClassificationHandler:
    def __init__(self, registry: ModelRegistry):
        self.registry = registry
        self.pools = PoolVectorCache()  # clients often send the same labelled pool with every request

    async def create(self, req: ClassificationRequest) -> ClassificationResponse:
        lm, adapter = self.registry.resolve_generator(
            req.model
        )  # an ft: model or --lora adapter scores through its base engine
        embedder = None
        most = req.k if isinstance(req.k, int) else max(req.k) if req.k else None
        if req.examples and req.selection == "nearest" and (most is None or most < len(req.examples)):
            name = req.embedding_model or next(iter(self.registry.embedders), None)
            embedder = self.registry.resolve_embedder(name).embedder if name else None
        inputs = [req.input] if isinstance(req.input, str) else req.input
        labels = [l if isinstance(l, str) else l.model_dump() for l in req.labels]
        examples = [e.model_dump() for e in req.examples or []]
        options = PromptOptions(
            req.instruction,
            examples,
            req.k,
            req.selection,
            req.seed,
            req.answer_prefix,
            req.example_format,
            req.input_prefix,
        )
        results = await Classifier(lm, embedder, adapter, self.pools).classify(inputs, labels, options, req.calibrate)
        used = sum(r.prompt_tokens for r in results)
        return ClassificationResponse(
            id=new_id("clf"),
            created=now(),
            model=req.model,
            data=[
                Classification(index=i, label=r.label, probabilities=r.probabilities, examples=r.examples)
                for i, r in enumerate(results)
            ],
            usage=Usage(prompt_tokens=used, completion_tokens=0, total_tokens=used),
        )
