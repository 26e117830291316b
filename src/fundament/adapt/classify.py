"""Classification by prompting: a probability for every label, from the model's likelihood of
each full label (multi-token labels included), normalised over the label set.

The prompt (see prompt.py) names the labels, shows optional labelled examples (the k nearest to
each input in an embedding space, Liu et al. 2022, "What Makes Good In-Context Examples for
GPT-3?", or k at random), then the input; each label is scored as the assistant's whole answer,
end-of-turn token included, so a label that is a prefix of another is not favoured. All labels
of an input (and its content-free twin) are scored from one engine request that prefills the
prompt once. Calibration divides by the label probabilities of a content-free input (Zhao et al.
2021, "Calibrate Before Use") or by their mean over the call's inputs (the bias estimate of
Batch Calibration, Zhou et al. 2024).
Knows the generation model (tokenizer + engine) and an embedder; knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..errors import ContextLengthExceededError, InvalidRequestError
from .prompt import EXAMPLE_FORMATS, PromptFormat

CONTENT_FREE = "N/A"
CALIBRATIONS = ("none", "content_free", "batch")


@dataclass
class Label:
    name: str
    description: str = ""


@dataclass
class ClassificationResult:
    label: str
    probabilities: dict[str, float]
    examples: list[int] = field(default_factory=list)  # indices of the examples shown
    prompt_tokens: int = 0  # tokens scored: the shared prompt once, then each label's own
    uncalibrated: dict[str, float] | None = None  # when calibrated: the probabilities before it


def _labels(labels) -> list[Label]:
    if not labels:
        raise InvalidRequestError("labels must list at least two labels.", "labels")
    out = [
        Label(l)
        if isinstance(l, str)
        else Label(
            l["name"] if isinstance(l, dict) else l.name,
            (l.get("description") if isinstance(l, dict) else l.description) or "",
        )
        for l in labels
    ]
    if len(out) < 2:
        raise InvalidRequestError("labels must list at least two labels.", "labels")
    names = [l.name for l in out]
    for i, n in enumerate(names):
        if not n.strip():
            raise InvalidRequestError(f"labels[{i}] is empty.", "labels")
        if names.index(n) != i:
            raise InvalidRequestError(f"labels[{i}] '{n}' is a duplicate; every label must be distinct.", "labels")
    return out


def calibration_mode(calibrate: bool | str | None) -> str:
    """`calibrate` as given (a bool, or one of CALIBRATIONS) as one of CALIBRATIONS."""
    if calibrate is True:
        return "content_free"
    if calibrate in (False, None):
        return "none"
    if calibrate not in CALIBRATIONS:
        raise InvalidRequestError(
            f"calibrate must be true, false or one of {', '.join(CALIBRATIONS)}; got {calibrate!r}.", "calibrate"
        )
    return calibrate


def batch_calibrate(p: np.ndarray) -> np.ndarray:
    """p (inputs, labels): each row divided by the mean row, then renormalised. The mean over a
    sample of the task's inputs estimates the prompt's bias towards each label (Zhou et al. 2024)."""
    q = p / np.maximum(p.mean(axis=0, keepdims=True), 1e-12)
    return q / q.sum(axis=1, keepdims=True)


def _common_prefix(seqs: list[list[int]]) -> int:
    """How many leading tokens all sequences share (at most the shortest's length)."""
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


def _softmax(ll: np.ndarray) -> np.ndarray:
    p = np.exp(ll - ll.max(axis=-1, keepdims=True))
    return p / p.sum(axis=-1, keepdims=True)


class PoolVectorCache:
    """The unit vectors of recently seen example pools, by embedder and the pool's texts, so a
    client that sends the same labelled pool with every request has it embedded once. Least
    recently used pools go first once the vectors pass `max_bytes`."""

    def __init__(self, max_bytes: int = 256 << 20):
        self.max_bytes = max_bytes
        self._pools: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._bytes = 0  # of the vectors held
        self._lock = threading.Lock()

    @staticmethod
    def _key(embedder, texts: list[str]) -> tuple:
        h = hashlib.sha256()
        for t in texts:
            h.update(t.encode("utf-8", "surrogatepass") + b"\x00")
        return id(embedder), len(texts), h.hexdigest()

    def get(self, embedder, texts: list[str]) -> np.ndarray | None:
        key = self._key(embedder, texts)
        with self._lock:
            v = self._pools.get(key)
            if v is not None:
                self._pools.move_to_end(key)
            return v

    def put(self, embedder, texts: list[str], vectors: np.ndarray) -> None:
        if vectors.nbytes > self.max_bytes:
            return
        key = self._key(embedder, texts)
        with self._lock:
            old = self._pools.pop(key, None)
            self._bytes += vectors.nbytes - (old.nbytes if old is not None else 0)
            self._pools[key] = vectors
            while self._bytes > self.max_bytes:
                self._bytes -= self._pools.popitem(last=False)[1].nbytes


@dataclass(frozen=True)
class PromptOptions:
    """How a classification prompt is built: the instruction, the labelled pool and how many of its
    examples to show (`k`: a number, or a list for an ensemble of prompts with that many each),
    chosen `nearest` to the input or at `random` (with `seed`), and the wording around the input
    and the answer."""

    instruction: str | None = None
    examples: list[dict] | None = None
    k: int | list[int] | None = None
    selection: str = "nearest"
    seed: int = 0
    answer_prefix: str = "Answer:"
    example_format: str = "list"
    input_prefix: str = ""


class Classifier:
    MAX_IN_FLIGHT = 32  # scorings submitted at once: enough to fill a batch, never the whole queue

    def __init__(self, lm, embedder=None, adapter: str | None = None, pool_cache: PoolVectorCache | None = None):
        """lm: a ServedGenerator (tokenizer + engine); embedder: an Embedder for nearest-example
        selection; adapter: a LoRA adapter loaded in lm's engine (an ft: model), or the base model;
        pool_cache: example pools' vectors shared between Classifiers (the server keeps one)."""
        self.lm, self.embedder, self.adapter, self.pool_cache = lm, embedder, adapter, pool_cache
        self._pool: tuple[list[str], np.ndarray] | None = None  # the last example pool's vectors

    def _vectors(self, texts: list[str]) -> np.ndarray:
        """Unit vectors (len(texts), D). An Embedder gives a matrix at once; any object with only
        `embed_texts` (evals/remote.py's embedder over a server) serves too."""
        if self.embedder is None:
            raise InvalidRequestError("selection 'nearest' needs an embedding model; none is served.", "selection")
        if hasattr(self.embedder, "vectors"):
            return self.embedder.vectors(texts)
        v = np.asarray(self.embedder.embed_texts(texts)[0], dtype=np.float32)
        return v / (np.linalg.norm(v, axis=1, keepdims=True) + 1e-12)

    def pool_vectors(self, texts: list[str]) -> np.ndarray:
        """The example pool's unit vectors (pool, D), kept for the next call with the same pool."""
        if self._pool is None or self._pool[0] != texts:
            vectors = self.pool_cache.get(self.embedder, texts) if self.pool_cache else None
            if vectors is None:
                vectors = self._vectors(texts)
                if self.pool_cache:
                    self.pool_cache.put(self.embedder, texts, vectors)
            self._pool = (list(texts), vectors)
        return self._pool[1]

    # The prompt as the turns format renders it, for callers that build the same chat themselves
    # (evals/finetune.py writes training data with this system message; evals/remote.py asks a
    # remote chat model in these words).
    def _instruction(self, labels: list[Label], instruction: str | None) -> str:
        return PromptFormat(instruction).system([(l.name, l.description) for l in labels], [])

    def _messages(self, system: str, shots: list[tuple[str, str]], text: str, answer_prefix: str) -> list[dict]:
        fmt = PromptFormat(answer_prefix=answer_prefix, example_format="turns")
        msgs = [{"role": "system", "content": system}]
        for x, y in shots:
            msgs += [{"role": "user", "content": x}, {"role": "assistant", "content": fmt.answer(y)}]
        return msgs + [{"role": "user", "content": text}]

    def select_examples(
        self, inputs: list[str], examples: list[tuple[str, str]], k: int, selection: str, seed: int
    ) -> list[list[int]]:
        """For each input, the indices of the k examples to show, most similar last (nearest to
        the question, as Liu et al. order them)."""
        if k == 0 or not examples:
            return [[] for _ in inputs]
        if selection == "random":
            rng = random.Random(seed)
            return [rng.sample(range(len(examples)), k) for _ in inputs]
        pool = self.pool_vectors([x for x, _ in examples])  # (pool, D), unit length
        queries = self._vectors(list(inputs))  # (inputs, D)
        chosen = []
        for start in range(0, len(inputs), 256):  # (256, pool) similarities at a time
            sims = queries[start : start + 256] @ pool.T
            top = (
                np.argpartition(-sims, k - 1, axis=1)[:, :k]
                if k < len(examples)
                else np.tile(np.arange(k), (len(sims), 1))
            )
            for row, idx in zip(sims, top):
                chosen.append(
                    [int(j) for j in idx[np.argsort(row[idx], kind="stable")]]
                )  # ascending: the nearest comes last
        return chosen

    async def _label_logprobs(
        self, prompts: list[list[int]], label_ids: list[list[int]], param: str, slots: asyncio.Semaphore
    ) -> tuple[np.ndarray, int]:
        """log P(label | prompt) for every prompt and label, (prompts, labels), from one engine
        scoring request: the prompts' common prefix and each prompt are prefilled once, whatever
        the number of labels. Also the number of tokens scored."""
        shared = _common_prefix(prompts)
        longest = max(len(x) for x in label_ids)
        for p in prompts:
            if len(p) + longest + 1 > self.lm.engine.max_context:
                raise ContextLengthExceededError(
                    f"The prompt ({len(p)} tokens) plus the longest label ({longest}) exceeds the context window of {self.lm.engine.max_context}. Use fewer or shorter examples.",
                    param,
                )
        conts = [p[shared:] + ids for p in prompts for ids in label_ids]
        async with slots:
            try:
                lps = await self.lm.engine.score(prompts[0][:shared], conts, adapter=self.adapter)
            except ContextLengthExceededError as e:
                e.param = param  # the engine knows token counts; the prompts came from this field
                raise
        out = np.empty((len(prompts), len(label_ids)))
        for i, p in enumerate(prompts):
            for j in range(len(label_ids)):
                out[i, j] = sum(lps[i * len(label_ids) + j][len(p) - shared :])
        return out, shared + sum(len(c) for c in conts)

    async def score(
        self,
        inputs: list[str],
        labels,
        options: PromptOptions = PromptOptions(),
        content_free: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> LabelScores:
        """Every label's probability for every input, from one pass: one engine request per input
        scores each prompt of the ensemble (one per k) and, with `content_free`, the same prompts
        with the content-free input. Combine with `LabelScores.probabilities(calibrate)`."""
        slots = asyncio.Semaphore(self.MAX_IN_FLIGHT)  # this call's requests in flight
        labels = _labels(labels)
        names = [l.name for l in labels]
        if not inputs:
            raise InvalidRequestError("input must not be empty.", "input")
        if options.example_format not in EXAMPLE_FORMATS:
            raise InvalidRequestError(f"example_format must be one of {', '.join(EXAMPLE_FORMATS)}.", "example_format")
        pool = []
        for i, ex in enumerate(options.examples or []):
            if ex.get("label") not in names:
                raise InvalidRequestError(
                    f"examples[{i}] has label {ex.get('label')!r}, which is not one of the labels.", "examples"
                )
            pool.append((str(ex.get("input", "")), ex["label"]))
        k = options.k
        ks = [len(pool)] if k is None else [k] if isinstance(k, int) else list(k)
        if not ks:
            raise InvalidRequestError("k must be a number or a non-empty list of numbers.", "k")
        for ki in ks:
            if ki < 0 or ki > len(pool):
                raise InvalidRequestError(f"k is {ki} but the example pool has {len(pool)} examples.", "k")
        if options.selection not in ("nearest", "random"):
            raise InvalidRequestError("selection must be 'nearest' or 'random'.", "selection")
        limit = self.lm.engine.max_context
        tok = self.lm.tokenizer
        for i, l in enumerate(labels):
            if len(tok.encode(l.name)) + 1 >= limit:
                raise ContextLengthExceededError(
                    f"labels[{i}] is longer than the context window ({limit} tokens).", "labels"
                )

        def select_and_check() -> list[list[int]]:
            chosen = self.select_examples(inputs, pool, max(ks), options.selection, options.seed)
            # Only the examples shown can make a prompt too long: checking those, not the whole
            # pool, keeps a request against a 67k-example pool from tokenizing all of it each time.
            for i in sorted({j for c in chosen for j in c}):
                if len(tok.encode(pool[i][0])) >= limit:
                    raise ContextLengthExceededError(
                        f"examples[{i}] is longer than the context window ({limit} tokens).", "examples"
                    )
            return chosen

        # Tokenizing and embedding a large pool takes seconds to minutes: not on the event loop.
        chosen = await asyncio.to_thread(select_and_check)
        fmt = PromptFormat(options.instruction, options.answer_prefix, options.input_prefix, options.example_format)
        label_pairs = [(l.name, l.description) for l in labels]
        # The assistant's answer starts with `answer_prefix` (e.g. "The review is"), then the label:
        # the closer this is to how the model answers on its own, the better its likelihoods rank.
        prefix_ids = tok.encode(options.answer_prefix) if options.answer_prefix else []
        end = tok.eos_token_ids[:1]
        label_ids = [tok.encode((" " if options.answer_prefix else "") + name) + end for name in names]
        texts_per_input = 2 if content_free else 1

        async def one(i: int, text: str) -> tuple[np.ndarray, int]:
            shots = [pool[j] for j in chosen[i]]
            prompts = [
                tok.apply_chat_template(fmt.messages(label_pairs, shots[len(shots) - ki :], t)) + prefix_ids
                for ki in ks  # an ensemble member with the ki examples nearest the input (the last ki)
                for t in ([text, CONTENT_FREE] if content_free else [text])
            ]
            ll, used = await self._label_logprobs(prompts, label_ids, "input", slots)
            if progress is not None:
                progress(1)
            return _softmax(ll).reshape(len(ks), texts_per_input, len(names)), used

        # A task group, not gather: when one input fails or the request is cancelled (the client
        # went away), every other input's engine work is cancelled with it instead of running on.
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(one(i, t)) for i, t in enumerate(inputs)]
        except ExceptionGroup as eg:  # the first failure is the answer (a 4xx names its input)
            raise eg.exceptions[0] from None
        scored = [t.result() for t in tasks]
        p = np.stack([x for x, _ in scored], axis=1)  # (members, inputs, texts, labels)
        return LabelScores(
            names,
            p[:, :, 0],
            p[:, :, 1] if content_free else None,
            [[int(j) for j in c] for c in chosen],
            [u for _, u in scored],
        )

    async def classify(
        self,
        inputs: list[str],
        labels,
        options: PromptOptions = PromptOptions(),
        calibrate: bool | str = False,
        progress: Callable[[int], None] | None = None,
    ) -> list[ClassificationResult]:
        """`calibrate`: False/"none", True/"content_free" or "batch" (see the module docstring);
        `k` a number, or a list of numbers for an ensemble of prompts with that many examples each;
        `progress` is called with 1 as each input is done."""
        mode = calibration_mode(calibrate)
        if mode == "batch" and len(inputs) < 2:
            raise InvalidRequestError(
                "calibrate 'batch' estimates the bias from the call's inputs: give many inputs (a sample of the task's), not one.",
                "calibrate",
            )
        scores = await self.score(inputs, labels, options, mode == "content_free", progress)
        final = scores.probabilities(mode)
        raw = scores.probabilities("none") if mode != "none" else None
        results = []
        for i in range(len(inputs)):
            probs = dict(zip(scores.names, map(float, final[i])))
            results.append(
                ClassificationResult(
                    max(probs, key=probs.__getitem__),
                    probs,
                    scores.examples[i],
                    scores.prompt_tokens[i],
                    uncalibrated=dict(zip(scores.names, map(float, raw[i]))) if raw is not None else None,
                )
            )
        return results


@dataclass
class LabelScores:
    """One pass's label probabilities, before calibration and ensembling."""

    names: list[str]
    inputs: np.ndarray  # (members, inputs, labels): each ensemble member's probabilities
    content_free: np.ndarray | None  # (members, inputs, labels): with the content-free input instead
    examples: list[list[int]]  # per input, the example indices shown (the largest k's)
    prompt_tokens: list[int]  # per input, tokens scored

    def probabilities(self, calibrate: bool | str = False) -> np.ndarray:
        """(inputs, labels): each member calibrated, then the members' log-probabilities averaged
        and renormalised (a geometric mean, as prompt ensembles of log-linear scores combine)."""
        mode = calibration_mode(calibrate)
        p = self.inputs
        if mode == "content_free":  # Zhao et al. 2021: divide by the content-free input's probabilities
            if self.content_free is None:
                raise ValueError("these scores were computed without the content-free input")
            p = p / np.maximum(self.content_free, 1e-12)
            p = p / p.sum(axis=-1, keepdims=True)
        elif mode == "batch":
            p = np.stack([batch_calibrate(m) for m in p])
        log = np.log(np.maximum(p, 1e-30)).mean(axis=0)
        return _softmax(log)
