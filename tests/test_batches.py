"""The Batches API through the official client on the real default model: a file of chat requests
with bad lines among them runs to completion across a SIGKILL of the server (each request's result
exactly once, in the input's order; the bad lines in the error file, the rest unharmed), greedy
answers equal to the same requests sent one by one; embeddings and classifications batched; cancel;
cursor pagination; and the 400s of a bad create."""

from __future__ import annotations

import json
import os
import signal
import time

import openai
import pytest
from conftest import ServerProcess

from fundament.server.serving_batches import parse_lines

pytestmark = pytest.mark.slow

CHAT = "/v1/chat/completions"


def test_bad_lines_are_named_and_the_rest_kept():
    lines = [
        json.dumps({"custom_id": "a", "method": "POST", "url": CHAT, "body": {"model": "m"}}),
        "{not json",
        "",
        json.dumps({"custom_id": "a", "method": "POST", "url": CHAT, "body": {}}),
        json.dumps({"method": "POST", "url": CHAT, "body": {}}),
        json.dumps({"custom_id": "b", "method": "GET", "url": CHAT, "body": {}}),
        json.dumps({"custom_id": "c", "method": "POST", "url": "/v1/embeddings", "body": {}}),
        json.dumps({"custom_id": "d", "method": "POST", "url": CHAT, "body": "hi"}),
        json.dumps([1, 2]),
    ]
    parsed = parse_lines("\n".join(lines).encode(), CHAT)
    assert [p.number for p in parsed] == [1, 2, 4, 5, 6, 7, 8, 9]  # blank lines skipped, numbers kept
    codes = [p.error[0] if p.error else None for p in parsed]
    assert codes == [
        None,
        "invalid_json_line",
        "duplicate_custom_id",
        "missing_custom_id",
        "invalid_method",
        "mismatched_endpoint",
        "invalid_body",
        "invalid_request",
    ]
    assert (
        parsed[0].body == {"model": "m"} and "Line 7" in parsed[5].error[1] and "/v1/embeddings" in parsed[5].error[1]
    )


def request(cid: str, body: dict, url: str = CHAT) -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body})


def chat_body(i: int) -> dict:
    return {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": f"Give one word that rhymes with number {i}."}],
        "max_tokens": 12,
        "temperature": 0,
    }


def wait(c, batch_id, pred, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        b = c.batches.retrieve(batch_id)
        if pred(b):
            return b
        time.sleep(0.3)
    raise AssertionError(f"batch {batch_id} still {b.status} ({b.request_counts}) after {timeout}s")


def read_jsonl(c, file_id) -> list[dict]:
    return [json.loads(line) for line in c.files.content(file_id).text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def home(server, tmp_path_factory):
    return tmp_path_factory.mktemp("batch-home")


def test_a_batch_survives_a_server_kill_and_bad_lines_land_in_the_error_file(home):
    n = 60
    good = [request(f"q{i}", chat_body(i)) for i in range(n)]
    bad = {
        "bad-json": "{oops",
        "bad-body": request("bad-body", {**chat_body(0), "max_tokens": 0}),  # a 400 from the handler
        "bad-model": request("bad-model", {**chat_body(0), "model": "no-such-model"}),  # a 404
        "bad-url": request("bad-url", {"model": "all-minilm-l6-v2", "input": "x"}, url="/v1/embeddings"),
        "bad-stream": request("bad-stream", {**chat_body(0), "stream": True}),
    }
    lines = good[:10] + list(bad.values()) + good[10:]
    srv = ServerProcess([], home)
    try:
        c = openai.OpenAI(base_url=srv.base_url, api_key="sk-test", max_retries=0, timeout=60)
        f = c.files.create(file=("requests.jsonl", "\n".join(lines).encode()), purpose="batch")
        batch = c.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h", metadata={"run": "kill"})
        assert batch.status in ("validating", "in_progress") and batch.metadata == {"run": "kill"}
        part = wait(c, batch.id, lambda b: b.request_counts.completed >= 15)
        assert part.status == "in_progress" and part.request_counts.total == len(lines)
        os.kill(srv.proc.pid, signal.SIGKILL)  # no chance to save anything more
        srv.proc.wait()
    finally:
        srv.stop()
    srv = ServerProcess([], home)
    try:
        c = openai.OpenAI(base_url=srv.base_url, api_key="sk-test", max_retries=0, timeout=60)
        done = wait(c, batch.id, lambda b: b.status == "completed")
        counts = done.request_counts
        assert (counts.total, counts.completed, counts.failed) == (len(lines), n, len(bad))
        assert done.completed_at >= done.finalizing_at >= done.in_progress_at >= done.created_at
        out, err = read_jsonl(c, done.output_file_id), read_jsonl(c, done.error_file_id)
        assert [o["custom_id"] for o in out] == [f"q{i}" for i in range(n)]  # each once, in the input's order
        assert all(o["response"]["status_code"] == 200 and o["error"] is None for o in out)
        assert {e.get("custom_id") for e in err} == {None, "bad-body", "bad-model", "bad-url", "bad-stream"}
        by_id = {e["custom_id"]: e for e in err}
        assert by_id["bad-body"]["response"]["status_code"] == 400
        assert by_id["bad-body"]["response"]["body"]["error"]["param"] == "max_tokens"
        assert by_id["bad-model"]["response"]["status_code"] == 404
        assert by_id["bad-url"]["error"]["code"] == "mismatched_endpoint"
        assert by_id["bad-stream"]["response"]["body"]["error"]["param"] == "stream"
        assert by_id[None]["error"]["code"] == "invalid_json_line" and "Line 11" in by_id[None]["error"]["message"]
        # the same answers as the requests sent one by one (greedy)
        for i in (0, 17, 59):
            one = c.chat.completions.create(**chat_body(i))
            body = out[i]["response"]["body"]
            assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] > 0
            assert body["choices"][0]["message"]["content"] == one.choices[0].message.content

        # other endpoints, cancel, listing
        emb_lines = [
            request(f"e{i}", {"model": "all-minilm-l6-v2", "input": f"text {i}"}, "/v1/embeddings") for i in range(3)
        ]
        cls_body = {"model": "gpt-4o-mini", "input": "I loved it", "labels": ["positive", "negative"]}
        ef = c.files.create(file=("e.jsonl", "\n".join(emb_lines).encode()), purpose="batch")
        cf = c.files.create(file=("c.jsonl", request("c0", cls_body, "/v1/classifications").encode()), purpose="batch")
        eb = c.batches.create(input_file_id=ef.id, endpoint="/v1/embeddings", completion_window="24h")
        cb = c.batches.create(input_file_id=cf.id, endpoint="/v1/classifications", completion_window="24h")
        eb, cb = (wait(c, b.id, lambda b: b.status == "completed") for b in (eb, cb))
        vectors = [o["response"]["body"]["data"][0]["embedding"] for o in read_jsonl(c, eb.output_file_id)]
        assert len(vectors) == 3 and all(len(v) == 384 for v in vectors)
        probs = read_jsonl(c, cb.output_file_id)[0]["response"]["body"]["data"][0]
        assert probs["label"] == "positive"

        many = c.files.create(
            file=("m.jsonl", "\n".join(request(f"m{i}", chat_body(i)) for i in range(200)).encode()), purpose="batch"
        )
        mb = c.batches.create(input_file_id=many.id, endpoint=CHAT, completion_window="24h")
        wait(c, mb.id, lambda b: b.request_counts.completed >= 1)
        assert c.batches.cancel(mb.id).status in ("cancelling", "cancelled")
        mb = wait(c, mb.id, lambda b: b.status == "cancelled")
        kept = read_jsonl(c, mb.output_file_id)
        assert 1 <= len(kept) == mb.request_counts.completed < 200 and mb.cancelled_at is not None

        ids = [b.id for b in c.batches.list(limit=2)]  # the page iterator follows the cursor
        assert ids[:4] == [mb.id, cb.id, eb.id, batch.id]
        with pytest.raises(openai.BadRequestError) as e:
            c.batches.cancel(batch.id)
        assert "completed" in str(e.value)
        for kwargs, param in (
            ({"input_file_id": f.id, "endpoint": "/v1/responses", "completion_window": "24h"}, "endpoint"),
            ({"input_file_id": f.id, "endpoint": CHAT, "completion_window": "1h"}, "completion_window"),
            ({"input_file_id": "file-nope", "endpoint": CHAT, "completion_window": "24h"}, "input_file_id"),
        ):
            with pytest.raises(openai.BadRequestError) as e:
                c.batches.create(**kwargs)
            assert e.value.body["param"] == param
        with pytest.raises(openai.NotFoundError):
            c.batches.retrieve("batch_nope")
    finally:
        srv.stop()
