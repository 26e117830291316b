"""The Classifier's arithmetic and prompt without a model: calibration, ensembling, the two example
formats. (End to end on the real model: test_classification.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from fundament.adapt.classify import (
    Classifier,
    LabelScores,
    PoolVectorCache,
    PromptOptions,
    batch_calibrate,
    calibration_mode,
)
from fundament.adapt.prompt import PromptFormat
from fundament.errors import InvalidRequestError


def test_batch_calibration_divides_by_the_mean_row():
    p = np.array([[0.9, 0.1], [0.7, 0.3]])  # the prompt favours label 0: mean (0.8, 0.2)
    q = batch_calibrate(p)
    expect = np.array([[0.9 / 0.8, 0.1 / 0.2], [0.7 / 0.8, 0.3 / 0.2]])
    assert q == pytest.approx(expect / expect.sum(axis=1, keepdims=True))
    assert q.argmax(axis=1).tolist() == [0, 1]  # the second input flips once the bias is removed


def test_label_scores_calibrate_each_member_then_average_log_probabilities():
    inputs = np.array([[[0.6, 0.4]], [[0.2, 0.8]]])  # (members 2, inputs 1, labels 2)
    cf = np.array([[[0.5, 0.5]], [[0.4, 0.6]]])
    s = LabelScores(["a", "b"], inputs, cf, [[]], [0])
    raw = np.exp((np.log(inputs[0, 0]) + np.log(inputs[1, 0])) / 2)
    assert s.probabilities("none")[0] == pytest.approx(raw / raw.sum())
    m0, m1 = inputs[0, 0] / cf[0, 0], inputs[1, 0] / cf[1, 0]
    m0, m1 = m0 / m0.sum(), m1 / m1.sum()
    both = np.exp((np.log(m0) + np.log(m1)) / 2)
    assert s.probabilities(True)[0] == pytest.approx(both / both.sum())
    with pytest.raises(ValueError, match="content-free"):
        LabelScores(["a", "b"], inputs, None, [[]], [0]).probabilities("content_free")


def test_calibration_modes():
    assert [calibration_mode(x) for x in (False, True, None, "batch", "none")] == [
        "none",
        "content_free",
        "none",
        "batch",
        "none",
    ]
    with pytest.raises(InvalidRequestError) as e:
        calibration_mode("platt")
    assert e.value.param == "calibrate"


LABELS = [("positive", ""), ("negative", "an unfavourable review")]
SHOTS = [("a dull film", "negative"), ("a gem", "positive")]


def test_list_format_shows_examples_in_the_system_message():
    fmt = PromptFormat("Classify the review.", "The review is", "Review:", "list")
    msgs = fmt.messages(LABELS, SHOTS, "fine acting")
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert msgs[0]["content"] == (
        "Classify the review.\nAnswer with exactly one of these labels and nothing else:\n- positive\n"
        "- negative: an unfavourable review\n\nExamples:\n\n"
        "Review: a dull film\nThe review is negative\n\nReview: a gem\nThe review is positive"
    )
    assert msgs[1]["content"] == "Review: fine acting"


def test_turns_format_shows_examples_as_earlier_turns():
    msgs = PromptFormat(None, "Answer:", "", "turns").messages(LABELS, SHOTS, "fine acting")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert "Examples" not in msgs[0]["content"] and msgs[0]["content"].startswith("Classify the input.")
    assert [m["content"] for m in msgs[1:]] == [
        "a dull film",
        "Answer: negative",
        "a gem",
        "Answer: positive",
        "fine acting",
    ]


class CountingEmbedder:
    """Unit vectors from letter counts; counts how many texts it was asked to embed."""

    def __init__(self):
        self.embedded = 0

    def vectors(self, texts):
        self.embedded += len(texts)
        v = np.array([[t.count(c) + 0.1 for c in "aeiou"] for t in texts], dtype=np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_pool_vectors_are_embedded_once_across_classifiers_sharing_a_cache():
    emb, cache = CountingEmbedder(), PoolVectorCache()
    pool = [("an awful film", "negative"), ("a lovely score", "positive"), ("dull", "negative")]
    first = Classifier(None, emb, pool_cache=cache).select_examples(["lovely"], pool, 1, "nearest", 0)
    assert emb.embedded == 4  # the pool, then the input
    again = Classifier(None, emb, pool_cache=cache).select_examples(["lovely"], pool, 1, "nearest", 0)
    assert again == first == [[1]] and emb.embedded == 5  # only the input this time
    Classifier(None, emb, pool_cache=cache).select_examples(["lovely"], pool[:2], 1, "nearest", 0)
    assert emb.embedded == 8  # another pool is embedded anew


def test_pool_vector_cache_drops_the_least_recently_used_pool_past_its_bound():
    emb = CountingEmbedder()
    one = np.zeros((10, 4), dtype=np.float32)  # 160 bytes
    cache = PoolVectorCache(max_bytes=2 * one.nbytes)
    for name in ("a", "b"):
        cache.put(emb, [name], one)
    assert cache.get(emb, ["a"]) is not None  # a is now the most recent
    cache.put(emb, ["c"], one)
    assert cache.get(emb, ["b"]) is None and cache.get(emb, ["a"]) is not None and cache.get(emb, ["c"]) is not None
    cache.put(emb, ["huge"], np.zeros((100, 4), dtype=np.float32))  # larger than the bound: not kept
    assert cache.get(emb, ["huge"]) is None and cache.get(emb, ["a"]) is not None


class WordLM:
    """A stand-in chat model: a token per word, every label equally likely; counts the texts it
    tokenizes."""

    class Tokenizer:
        eos_token_ids = [0]

        def __init__(self):
            self.encoded: list[str] = []

        def encode(self, text):
            self.encoded.append(text)
            return [1] * len(text.split())

        def apply_chat_template(self, messages):
            return [1] * sum(len(m["content"].split()) + 2 for m in messages)

    class Engine:
        max_context = 64

        async def score(self, prefix, continuations, adapter=None, param=None):
            return [[-1.0] * len(c) for c in continuations]

    def __init__(self):
        self.tokenizer, self.engine = self.Tokenizer(), self.Engine()


def test_only_the_examples_shown_are_tokenized_and_a_shown_one_past_the_context_is_named():
    import asyncio

    from fundament.errors import ContextLengthExceededError

    lm = WordLM()
    pool = [{"input": f"example number {i}", "label": "positive" if i % 2 else "negative"} for i in range(500)]
    out = asyncio.run(
        Classifier(lm).classify(
            ["a fine film"], ["positive", "negative"], PromptOptions(examples=pool, k=2, selection="random")
        )
    )
    assert len(out[0].examples) == 2
    assert sum(t.startswith("example number") for t in lm.tokenizer.encoded) == 2  # not the 500 of the pool

    pool[out[0].examples[0]]["input"] = "word " * 100  # an example that is shown, longer than the context
    with pytest.raises(ContextLengthExceededError) as e:
        asyncio.run(
            Classifier(WordLM()).classify(
                ["a fine film"], ["positive", "negative"], PromptOptions(examples=pool, k=2, selection="random")
            )
        )
    assert e.value.param == "examples" and f"examples[{out[0].examples[0]}]" in str(e.value)
