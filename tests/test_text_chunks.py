"""The streaming handlers' per-token fast paths: chunks written from a template (TextChunks) and
one sequence merged without a queue."""

from __future__ import annotations

import asyncio
import contextlib
import json

from pydantic import BaseModel

from fundament.server.generation import TextChunks, merge
from fundament.server.protocol import ChatChunkChoice, ChatCompletionChunk, DeltaMessage

TEXTS = [
    "",
    "Hello",
    ' "quoted" \\ back',
    "line\nbreak\ttab\r",
    "\x00\x1f\x7f",
    "é 漢字 🙂",
    "\u2028\u2029",
    "</script>",
]


def chat_chunk(i: int, text: str) -> ChatCompletionChunk:
    return ChatCompletionChunk(
        id="chatcmpl-1",
        created=1,
        model="m",
        choices=[ChatChunkChoice(index=i, delta=DeltaMessage(content=text))],
        system_fingerprint="fp_1",
    )


def test_a_templated_chunk_is_the_models_own_json():
    chunks = TextChunks(chat_chunk)
    for i in (0, 3):
        for text in TEXTS:
            got = chunks(i, text)
            want = f"data: {chat_chunk(i, text).model_dump_json()}\n\n"
            assert got.startswith("data: ") and got.endswith("\n\n")
            assert json.loads(got[6:]) == json.loads(want[6:])
            assert json.loads(got[6:])["choices"][0] == {
                "index": i,
                "delta": {"role": None, "content": text, "refusal": None, "tool_calls": None},
                "finish_reason": None,
                "logprobs": None,
            }


class Shouting(BaseModel):
    text: str


def test_a_model_that_changes_the_text_is_dumped_each_time():
    chunks = TextChunks(lambda i, text: Shouting(text=text.upper()))
    assert chunks(0, "quiet") == 'data: {"text":"QUIET"}\n\n'


def test_one_stream_is_closed_when_its_reader_stops():
    closed = []

    async def tokens():
        try:
            for i in range(10):
                yield i
        finally:
            closed.append(True)

    async def read_two():
        got = []
        async with contextlib.aclosing(merge([tokens()])) as merged:
            async for i, x in merged:
                got.append((i, x))
                if len(got) == 2:
                    break
        return got

    assert asyncio.run(read_two()) == [(0, 0), (0, 1)] and closed == [True]
