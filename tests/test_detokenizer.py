"""Streaming text from token ids: the deltas joined are the whole decode, no delta splits a
character, through tokenizers' DecodeStream (fast tokenizers) and the window scheme (others)."""

from __future__ import annotations

from fundament.models.tokenizer import ChatTokenizer, IncrementalDetokenizer

TEXT = "Héllo wörld — emoji 😀👍🏽 and 中文 text, tabs\tand\nnewlines; naïve café. " * 4


def deltas(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detok.add(i) for i in ids]


def test_streamed_text_equals_the_whole_decode_both_ways(smollm_dir):
    tok = ChatTokenizer(smollm_dir)
    ids = tok.encode(TEXT) + [tok.hf.convert_tokens_to_ids("<|im_end|>")]  # a special token: skipped
    fast = IncrementalDetokenizer(tok)
    assert fast._stream is not None  # the default model's tokenizer is a fast one: DecodeStream
    window = IncrementalDetokenizer(tok)
    window._stream = None  # the fallback scheme
    a, b = deltas(fast, ids), deltas(window, ids)
    assert "".join(a) == "".join(b) == tok.decode(ids) == TEXT
    # an emoji spans several byte tokens: no delta carries half of one
    assert all("\ufffd" not in d for d in a + b)
    assert sum(1 for d in a if d == "") >= 2  # the bytes before a character completes, and the special token
