"""GET /metrics on the real server, parsed with prometheus-client's own parser: request counters by
endpoint, model and status move by exactly the requests sent; token counters by exactly the
usage the official client saw; time-to-first-token and latency histograms count each request;
engine gauges read idle when idle; and each request leaves one log line."""

from __future__ import annotations

import re

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow


def scrape(server) -> dict[tuple, float]:
    text = httpx.get(server.base_url.removesuffix("/v1") + "/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def delta(before, after, name, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_metrics_move_by_exactly_the_requests_sent(server, client):
    before = scrape(server)
    usage = []
    for i in range(3):
        r = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": f"Say {i}"}], max_tokens=5
        )
        usage.append(r.usage)
    stream = client.completions.create(
        model="gpt-4o-mini", prompt="Once upon", max_tokens=4, stream=True, stream_options={"include_usage": True}
    )
    streamed = [c.usage for c in stream if c.usage][0]
    emb = client.embeddings.create(model="all-minilm-l6-v2", input=["one", "two words"])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    after = scrape(server)

    chat, comp = "/v1/chat/completions", "/v1/completions"
    name = "fundament:requests_total"
    assert delta(before, after, name, endpoint=chat, model_name="gpt-4o-mini", status="200") == 3
    assert delta(before, after, name, endpoint=comp, model_name="gpt-4o-mini", status="200") == 1
    assert delta(before, after, name, endpoint="/v1/embeddings", model_name="all-minilm-l6-v2", status="200") == 1
    assert delta(before, after, name, endpoint=chat, model_name="no-such-model", status="404") == 1
    generated = sum(u.completion_tokens for u in usage) + streamed.completion_tokens
    prompted = sum(u.prompt_tokens for u in usage) + streamed.prompt_tokens
    assert delta(before, after, "fundament:generation_tokens_total", model_name="gpt-4o-mini") == generated
    assert delta(before, after, "fundament:prompt_tokens_total", model_name="gpt-4o-mini") == prompted
    assert (
        delta(before, after, "fundament:prompt_tokens_total", model_name="all-minilm-l6-v2") == emb.usage.prompt_tokens
    )
    assert delta(before, after, "fundament:time_to_first_token_seconds_count", model_name="gpt-4o-mini") == 4
    assert delta(before, after, "fundament:e2e_request_latency_seconds_count", model_name="gpt-4o-mini") == 4
    ttft_sum = delta(before, after, "fundament:time_to_first_token_seconds_sum", model_name="gpt-4o-mini")
    e2e_sum = delta(before, after, "fundament:e2e_request_latency_seconds_sum", model_name="gpt-4o-mini")
    assert 0 < ttft_sum < e2e_sum
    idle = {"model_name": "smollm2-135m-instruct"}
    assert after[("fundament:num_requests_running", tuple(idle.items()))] == 0
    assert after[("fundament:num_requests_waiting", tuple(idle.items()))] == 0
    assert after[("fundament:kv_cache_usage_perc", tuple(idle.items()))] == 0

    lines = [ln for ln in server.log.read_text().splitlines() if "fundament.requests" in ln]
    ours = [ln for ln in lines if "POST /v1/chat/completions model=gpt-4o-mini" in ln][-3:]
    for ln, u in zip(ours, usage):
        m = re.search(r"prompt_tokens=(\d+) completion_tokens=(\d+) latency_ms=(\d+) status=200", ln)
        assert m and (int(m[1]), int(m[2])) == (u.prompt_tokens, u.completion_tokens), ln
    assert any("model=no-such-model" in ln and "status=404" in ln for ln in lines)
