"""A cell that fails: `fundament eval` finishes the other cells, writes the report naming the failed
cell and its error, exits non-zero, and does not cache the failure, so a rerun retries it. A remote
server that is down (a closed port on 127.0.0.1), and a local strategy that raises."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from conftest import free_port
from test_evals_report import assert_report_matches

from fundament.cli import main

WORDS = {"good": ["great", "lovely", "superb", "fine", "wonderful"], "bad": ["awful", "dull", "poor", "boring", "ugly"]}


def write_task(root: Path) -> Path:
    rows = [{"text": f"a {w} film, {v} acting", "label": label} for label, ws in WORDS.items() for w in ws for v in ws]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "task.yaml").write_text("name: films\nlabels: [good, bad]\nfile: data.jsonl\ntest_fraction: 0.3\n")
    return root / "task.yaml"


class ChatServer:
    """An OpenAI-compatible chat server on 127.0.0.1 that answers the label the text's words give
    away (no logprobs, as many servers); it counts the requests it answers."""

    def __init__(self, port: int):
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                assert self.path == "/v1/chat/completions", self.path
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                text = body["messages"][-1]["content"]
                label = "good" if any(w in text for w in WORDS["good"]) else "bad"
                outer.requests += 1
                reply = {
                    "id": f"chatcmpl-{outer.requests}",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": label},
                            "finish_reason": "stop",
                            "logprobs": None,
                        }
                    ],
                }
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _cached(cache: Path, strategy: str) -> list[str]:
    return sorted(p.name for p in (cache / "results" / "films" / strategy).glob("*.json"))


def test_a_remote_server_that_is_down_fails_its_cell_and_the_command_and_a_rerun_retries_it(tmp_path, capsys):
    task, out, cache = write_task(tmp_path), tmp_path / "report", tmp_path / "cache"
    port = free_port()  # nothing listens on it
    url = f"http://127.0.0.1:{port}/v1"
    args = [
        "eval",
        "--task",
        str(task),
        "--strategies",
        "remote-zero-shot,tfidf",
        "--sizes",
        "0,16",
        "--limit",
        "6",
        "--latency-sample",
        "2",
        "--remote-base-url",
        url,
        "--remote-model",
        "some-chat-model",
        "--out",
        str(out),
        "--cache-dir",
        str(cache),
    ]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert (
        f"fundament: 1 of 2 cells failed (listed in {out / 'report.md'}); running the same command again retries them"
        in err
    )

    results = assert_report_matches(out)  # the cell that could run is in the tables as usual
    [failure] = results["errors"]
    assert {k: failure[k] for k in ("task", "strategy", "size", "seed", "type")} == {
        "task": "films",
        "strategy": "remote-zero-shot",
        "size": 0,
        "seed": 0,
        "type": "APIConnectionError",
    }
    assert (
        failure["error"] == f"cannot reach {url}/chat/completions: Connection error. ([Errno 111] Connection refused)"
    )
    assert (results["cells"], results["cells_failed"]) == (1, 1)
    assert [(r["strategy"], r["size"]) for r in results["tasks"]["films"]["rows"]] == [("tfidf", 16)]
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert (
        "## Failed cells\n\n1 of 2 cells failed: they are missing from the tables and plots, and were not cached" in md
    )
    assert f"| films | remote-zero-shot | 0 | 0 | {failure['error']} |" in md
    assert "<h2>Failed cells</h2>" in page
    assert f"<tr><td>films</td><td>remote-zero-shot</td><td>0</td><td>0</td><td>{failure['error']}</td></tr>" in page
    assert _cached(cache, "remote-zero-shot") == [] and len(_cached(cache, "tfidf")) == 1

    server = ChatServer(port)  # fixed: the same URL answers now
    try:
        assert main(args) == 0
    finally:
        server.stop()
    assert server.requests == 6 + 2  # the 6 test examples, then 2 timed one by one: computed, not read back
    again = json.loads((out / "results.json").read_text())
    assert again["errors"] == [] and (again["cells"], again["cells_computed"], again["cells_failed"]) == (2, 1, 0)
    rows = {(r["strategy"], r["size"]): r for r in again["tasks"]["films"]["rows"]}
    assert rows[("remote-zero-shot", 0)]["accuracy"] == 1.0  # the server answers every text's label
    assert len(_cached(cache, "remote-zero-shot")) == 1
    assert "Failed cells" not in (out / "report.md").read_text()


def test_a_local_strategy_that_raises_is_reported_and_the_other_cells_still_run(tmp_path, capsys, monkeypatch):
    from fundament.evals import linear

    fit = linear.fit

    def fit_failing_at_4(model, texts, labels):
        if len(texts) == 4:
            raise ValueError("the solver did not converge")
        return fit(model, texts, labels)

    monkeypatch.setattr(linear, "fit", fit_failing_at_4)
    task, out, cache = write_task(tmp_path), tmp_path / "report", tmp_path / "cache"
    args = [
        "eval",
        "--task",
        str(task),
        "--strategies",
        "tfidf",
        "--sizes",
        "4,16",
        "--limit",
        "6",
        "--out",
        str(out),
        "--cache-dir",
        str(cache),
    ]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "fit_failing_at_4" in err  # not an expected failure: where it came from is shown
    assert "fundament: 1 of 2 cells failed" in err
    results = json.loads((out / "results.json").read_text())
    assert results["errors"] == [
        {
            "task": "films",
            "strategy": "tfidf",
            "size": 4,
            "seed": 0,
            "error": "ValueError: the solver did not converge",
            "type": "ValueError",
        }
    ]
    assert [r["size"] for r in results["tasks"]["films"]["rows"]] == [16]
    assert "| films | tfidf | 4 | 0 | ValueError: the solver did not converge |" in (out / "report.md").read_text()
    assert [n.split("-")[0] for n in _cached(cache, "tfidf")] == ["n16"]

    monkeypatch.setattr(linear, "fit", fit)
    assert main(args) == 0
    again = json.loads((out / "results.json").read_text())
    assert (again["cells"], again["cells_computed"], again["errors"]) == (2, 1, [])
    assert [n.split("-")[0] for n in _cached(cache, "tfidf")] == ["n16", "n4"]


def test_an_error_message_stays_one_row_of_the_markdown_table():
    from fundament.evals.report import failed, markdown

    message = "a | b\nsecond line"
    results = {
        "config": {
            "tasks": ["t"],
            "strategies": ["tfidf"],
            "sizes": [8],
            "seeds": [0],
            "limit": None,
            "out": "o",
            "model": "m",
            "embedding_model": "e",
            "k": 8,
        },
        "finished": "now",
        "cells_wall_s": 0.0,
        "wall_s": 0.0,
        "cells": 0,
        "cells_computed": 0,
        "cells_failed": 1,
        "strategies": {},
        "tasks": {},
        "errors": [{"task": "t", "strategy": "tfidf", "size": 8, "seed": 0, "error": message}],
    }
    assert failed(results)[1] == [["t", "tfidf", "8", "0", message]]
    assert "| t | tfidf | 8 | 0 | a \\| b second line |" in markdown(results, {})
