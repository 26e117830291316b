"""/openapi.json says what the server does: the statuses it answers with (400, not FastAPI's 422),
the error envelope, event streams, the multipart upload and the enforced limits; a 405 has Allow."""

from __future__ import annotations

import httpx
import pytest

from fundament.config import ServeConfig
from fundament.server.app import create_app


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    # module-scoped, so before the per-test home: a home of its own, not the user's
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FUNDAMENT_HOME", str(tmp_path_factory.mktemp("openapi-home")))
        return create_app(ServeConfig(max_body_bytes=1234)).openapi()


def operations(spec):
    return [(path, method, op) for path, ops in spec["paths"].items() for method, op in ops.items()]


def test_no_422_and_every_error_in_the_envelope(spec):
    for path, method, op in operations(spec):
        assert "422" not in op["responses"], (method, path)
        for status, r in op["responses"].items():
            if status.startswith(("4", "5")):
                assert r["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
    error = spec["components"]["schemas"]["ErrorResponse"]
    assert error["required"] == ["error"]


def test_statuses_per_operation(spec):
    chat = spec["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert sorted(chat) == ["200", "400", "401", "404", "413", "429", "503"]
    assert "1234 bytes" in chat["413"]["description"]
    assert sorted(spec["paths"]["/v1/models"]["get"]["responses"]) == ["200", "401"]
    assert sorted(spec["paths"]["/v1/files/{file_id}"]["get"]["responses"]) == ["200", "400", "401", "404"]


def test_generation_answers_have_schemas_and_streams(spec):
    for path, name in (
        ("/v1/chat/completions", "ChatCompletion"),
        ("/v1/completions", "Completion"),
        ("/v1/embeddings", "CreateEmbeddingResponse"),
    ):
        content = spec["paths"][path]["post"]["responses"]["200"]["content"]
        assert content["application/json"]["schema"] == {"$ref": f"#/components/schemas/{name}"}
    assert "text/event-stream" in spec["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]


def test_upload_and_limits_are_in_the_schema(spec):
    upload = spec["paths"]["/v1/files"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert upload["required"] == ["file", "purpose"] and "fine-tune" in upload["properties"]["purpose"]["enum"]
    emb = spec["components"]["schemas"]["EmbeddingRequest"]["properties"]["input"]["anyOf"]
    assert {s.get("maxItems") for s in emb} >= {2048}
    params = {p["name"]: p["schema"] for p in spec["paths"]["/v1/files"]["get"]["parameters"]}
    assert params["limit"]["maximum"] == 10000 and params["order"]["enum"] == ["asc", "desc"]


@pytest.mark.slow
def test_a_405_names_the_allowed_methods(server):
    r = httpx.put(f"{server.base_url}/chat/completions", json={}, timeout=10)
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json()["error"]["message"].startswith("PUT is not allowed on /v1/chat/completions")
