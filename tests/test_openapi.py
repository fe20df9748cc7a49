"""The API reference, in process: offline pages with a strict CSP, open with API keys, off by a setting, and
an OpenAPI document that tells the truth (statuses from errors.py's table, examples that really work)."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from embedding_service.api.cohere.errors import CohereError
from embedding_service.api.docs import CSP, REDOC_CSP, asset_dir
from embedding_service.api.embed.protocol import EMBEDDING_EXAMPLES
from embedding_service.api.openapi import BEARER_SCHEME
from embedding_service.api.schemas import EmbeddingResponse, ErrorResponse, Health, ModelCard, ModelList, ServiceInfo
from embedding_service.backends.fake.embed import FakeBackend
from embedding_service.engine.engine import EmbeddingEngine
from embedding_service.errors import ErrorKind, error_body, status_for

from .conftest import engine_options, fake_app_over, in_process_client

KEY = "sk-docs-0123456789"
Factory = Callable[..., httpx.AsyncClient]


@pytest.fixture
async def engine() -> AsyncIterator[EmbeddingEngine]:
    # 1024 dimensions, Matryoshka: the spec's model, so that the `dimensions` example applies.
    engine = EmbeddingEngine(FakeBackend(dimension=1024, max_model_len=64),
                             engine_options(max_model_len=64, batch_timeout_ms=0))
    await engine.start()
    yield engine
    await engine.stop()


@pytest.fixture
async def make_client(engine: EmbeddingEngine) -> AsyncIterator[Factory]:
    opened: list[httpx.AsyncClient] = []

    def factory(root_path: str = "", **settings: object) -> httpx.AsyncClient:
        opened.append(in_process_client(fake_app_over(engine, **settings), root_path))
        return opened[-1]

    yield factory
    for http in opened:
        await http.aclose()


# --- the pages -------------------------------------------------------------------------------------
async def test_pages_load_only_their_own_files_under_a_strict_csp(make_client: Factory) -> None:
    http = make_client()
    docs, redoc = await http.get("/docs"), await http.get("/redoc")
    assert docs.status_code == redoc.status_code == 200
    assert docs.headers["content-security-policy"] == CSP and redoc.headers["content-security-policy"] == REDOC_CSP
    assert "'unsafe-inline'" not in CSP.split("style-src", 1)[0] and "script-src 'self';" in CSP
    for page in (docs.text, redoc.text):
        assert "http:" not in page and "https:" not in page and "//" not in page  # no other origin at all
        assert "<script>" not in page  # no inline script: the CSP forbids it
    init = await http.get("/docs/swagger-init.js")
    assert init.status_code == 200 and "validatorUrl: null" in init.text  # no badge from validator.swagger.io
    for name in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js"):
        asset = await http.get(f"/docs/assets/{name}")
        assert asset.status_code == 200, name
        assert asset.content == (asset_dir() / name).read_bytes()  # the installed package's copy
    assert "swagger-ui-bundle.js" in docs.text and "redoc.standalone.js" in redoc.text


async def test_pages_follow_the_root_path(make_client: Factory) -> None:
    http = make_client(root_path="/embed")
    page = (await http.get("/docs")).text
    assert 'data-openapi-url="/embed/openapi.json"' in page and 'src="/embed/docs/assets/swagger-ui-bundle.js"' in page
    assert 'spec-url="/embed/openapi.json"' in (await http.get("/redoc")).text


async def test_reference_is_open_with_api_keys_and_operations_are_not(make_client: Factory) -> None:
    http = make_client(api_keys=[KEY])
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/swagger-init.js", "/docs/assets/swagger-ui.css"):
        assert (await http.get(path)).status_code == 200, path
    assert (await http.get("/v1/models")).status_code == 401
    assert (await http.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})).status_code == 200
    document = (await http.get("/openapi.json")).json()
    assert document["components"]["securitySchemes"][BEARER_SCHEME] == {
        "type": "http", "scheme": "bearer", "description": document["components"]["securitySchemes"][BEARER_SCHEME][
            "description"]}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            open_path = path in ("/health", "/health/live", "/health/ready", "/metrics")
            assert ("security" in operation) is not open_path, (method, path)
            assert ("401" in operation["responses"]) is not open_path, (method, path)
    challenge = document["paths"]["/v1/embeddings"]["post"]["responses"]["401"]["headers"]["WWW-Authenticate"]
    assert challenge["required"] is True


async def test_docs_setting_turns_the_reference_off(make_client: Factory) -> None:
    http = make_client(api_docs=False)
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/assets/swagger-ui.css"):
        response = await http.get(path)
        assert response.status_code == 404 and set(response.json()) == {"error"}, path
    assert "/docs" not in (await http.get("/")).json()["endpoints"]
    keyed = make_client(api_docs=False, api_keys=[KEY])
    assert (await keyed.get("/openapi.json")).status_code == 401  # not open when it is not there


async def test_no_keys_no_security_scheme_and_no_401(make_client: Factory) -> None:
    document = (await make_client().get("/openapi.json")).json()
    assert "securitySchemes" not in document.get("components", {})
    assert all("401" not in op["responses"] and "security" not in op
               for ops in document["paths"].values() for op in ops.values())


# --- the document --------------------------------------------------------------------------------------
def _operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(method, path, op) for path, ops in document["paths"].items() for method, op in ops.items()]


def _check_cohere_errors(content: dict[str, Any], status: int) -> None:
    cohere = CohereError.model_json_schema()
    envelope = {"$ref": "#/components/schemas/ErrorResponse"}
    assert content["schema"] in (cohere, {"anyOf": [cohere, envelope]}), status
    middleware = content["schema"] != cohere
    assert status in ((500, 503) if middleware else (400, 413, 415, 504)), status
    for name, example in content["examples"].items():
        assert status_for(ErrorKind(name)) == status
        if "error" in example["value"]:
            ErrorResponse.model_validate(example["value"])
        else:
            CohereError.model_validate(example["value"])


async def test_every_error_status_is_the_envelope_with_examples_from_the_error_table(make_client: Factory) -> None:
    document = (await make_client(rate_limit_rpm=1000).get("/openapi.json")).json()
    text = json.dumps(document)
    assert "422" not in document["paths"]["/v1/models/{model_id}"]["get"]["responses"]
    assert "HTTPValidationError" not in text and "ValidationError" not in text
    envelope = {"$ref": "#/components/schemas/ErrorResponse"}
    seen_kinds: set[ErrorKind] = set()
    for method, path, operation in _operations(document):
        assert "200" in operation["responses"], (method, path)
        assert "422" not in operation["responses"], (method, path)
        for status, response in operation["responses"].items():
            assert {"X-Request-Id", "X-Total-Time-Ms"} <= set(response["headers"]), (method, path, status)
            if status == "200" or (path in ("/health", "/health/ready") and status == "503"):
                continue
            content = response["content"]["application/json"]
            cohere_shaped = path in ("/v2/embed", "/v1/embed", "/v2/rerank")
            if cohere_shaped and content["schema"] != envelope:  # Cohere's shape, or either
                _check_cohere_errors(content, int(status))
                continue
            assert content["schema"] == envelope, (method, path, status)
            assert content["examples"], (method, path, status)
            for name, example in content["examples"].items():
                kind = ErrorKind(name)
                seen_kinds.add(kind)
                assert status_for(kind) == int(status), (method, path, name)
                ErrorResponse.model_validate(example["value"])
                assert example["value"]["error"]["type"] == error_body(kind, "x")["error"]["type"]
        if path not in ("/health", "/health/live", "/health/ready", "/metrics"):
            limited = operation["responses"]["429"]
            assert limited["headers"]["Retry-After"]["required"] is True
        assert "500" in operation["responses"], (method, path)
    embeddings = document["paths"]["/v1/embeddings"]["post"]["responses"]
    assert {"200", "400", "413", "415", "429", "500", "503", "504"} <= set(embeddings)
    assert set(embeddings["503"]["content"]["application/json"]["examples"]) == {
        "not_ready", "overloaded", "unhealthy", "draining"}
    assert embeddings["503"]["headers"]["Retry-After"]["required"] is False  # unhealthy sends none
    assert "404" in document["paths"]["/v1/models/{model_id}"]["get"]["responses"]
    assert ErrorKind.TIMEOUT in seen_kinds and ErrorKind.RATE_LIMITED in seen_kinds


async def test_documented_schemas_are_the_models_and_describe_the_real_answers(make_client: Factory) -> None:
    http = make_client()
    document = (await http.get("/openapi.json")).json()
    schemas = document["components"]["schemas"]
    for model in (EmbeddingResponse, ErrorResponse, Health, ModelCard, ModelList, ServiceInfo):
        assert model.__name__ in schemas
    body = document["paths"]["/v1/embeddings"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"] == {"$ref": "#/components/schemas/EmbeddingRequest"}
    assert "input" in schemas["EmbeddingRequest"]["required"]
    for path, model in (("/", ServiceInfo), ("/health", Health), ("/v1/models", ModelList),
                        ("/v1/models/fake-model", ModelCard)):
        response = await http.get(path)
        assert response.status_code == 200
        model.model_validate(response.json())
    missing = await http.get("/v1/models/other")
    assert missing.status_code == 404
    ErrorResponse.model_validate(missing.json())


@pytest.mark.parametrize("name", list(EMBEDDING_EXAMPLES))
async def test_every_request_example_works(name: str, make_client: Factory) -> None:
    http = make_client()
    document = (await http.get("/openapi.json")).json()
    examples = document["paths"]["/v1/embeddings"]["post"]["requestBody"]["content"]["application/json"]["examples"]
    assert set(examples) == {"single", "batch", "instruction", "base64", "dimensions"}
    sent = examples[name]["value"]
    response = await http.post("/v1/embeddings", json=sent)
    assert response.status_code == 200, response.text
    answer = EmbeddingResponse.model_validate(response.json())
    texts = [sent["input"]] if isinstance(sent["input"], str) else sent["input"]
    assert len(answer.data) == len(texts)
    first = answer.data[0].embedding
    if name == "base64":
        assert isinstance(first, str) and len(first) > 100
    else:
        assert isinstance(first, list) and len(first) == sent.get("dimensions", 1024)


def _assert_as_documented(document: dict[str, Any], method: str, path: str, response: httpx.Response) -> None:
    documented = document["paths"][path][method]["responses"]
    assert str(response.status_code) in documented, (method, path, response.status_code)
    for name, spec in documented[str(response.status_code)].get("headers", {}).items():
        value = response.headers.get(name)
        if value is None:
            assert not spec["required"], (method, path, response.status_code, name)
            continue
        assert re.search(spec["schema"]["pattern"], value), (name, value)
    if response.status_code >= 400:
        ErrorResponse.model_validate(response.json())


async def test_real_401_and_429_answers_are_as_documented(make_client: Factory) -> None:
    http = make_client(api_keys=[KEY], rate_limit_rpm=1)
    document = (await http.get("/openapi.json")).json()
    auth = {"Authorization": f"Bearer {KEY}"}
    refused = await http.post("/v1/embeddings", json={"input": "a"})
    assert refused.status_code == 401
    _assert_as_documented(document, "post", "/v1/embeddings", refused)
    served = await http.post("/v1/embeddings", json={"input": "a"}, headers=auth)
    assert served.status_code == 200
    _assert_as_documented(document, "post", "/v1/embeddings", served)
    limited = await http.get("/v1/models", headers=auth)
    assert limited.status_code == 429 and "retry-after" in limited.headers
    _assert_as_documented(document, "get", "/v1/models", limited)
    for _ in range(3):  # the reference is not rate limited
        assert (await http.get("/openapi.json")).status_code == 200
