"""CORS (cors_allow_origins): off by default; preflights answered without a key, the request itself still
needs one; a page from an origin not listed gets no CORS headers (its browser blocks the answer)."""

from __future__ import annotations

import httpx
import pytest

from embedding_service.config import EmbeddingConfig

from .conftest import fake_app, make_settings

KEY = "sk-cors-test-0123456789abcdef"
APP, OTHER = "https://app.example.com", "https://evil.example.net"
PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}


async def _preflight(http: httpx.AsyncClient, origin: str) -> httpx.Response:
    return await http.options("/v1/embeddings", headers={"Origin": origin, **PREFLIGHT})


async def test_off_by_default_no_cors_headers() -> None:
    async with fake_app() as app:
        response = await app.http.post("/v1/embeddings", json={"input": "x"}, headers={"Origin": APP})
        assert response.status_code == 200 and "access-control-allow-origin" not in response.headers
        assert "access-control-allow-origin" not in (await _preflight(app.http, APP)).headers


async def test_allowed_origin_preflight_without_key_and_request_with_key() -> None:
    async with fake_app(api_keys=[KEY], cors_allow_origins=f"{APP}/") as app:  # (a trailing slash is dropped)
        preflight = await _preflight(app.http, APP)
        assert preflight.status_code == 200, preflight.text  # no key: a browser sends none in a preflight
        assert preflight.headers["access-control-allow-origin"] == APP
        assert "POST" in preflight.headers["access-control-allow-methods"]
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        assert "access-control-allow-credentials" not in preflight.headers
        refused = await app.http.post("/v1/embeddings", json={"input": "x"}, headers={"Origin": APP})
        assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == APP  # readable
        served = await app.http.post("/v1/embeddings", json={"input": "x"},
                                     headers={"Origin": APP, "Authorization": f"Bearer {KEY}"})
        assert served.status_code == 200 and served.headers["access-control-allow-origin"] == APP
        assert "x-request-id" in served.headers["access-control-expose-headers"].lower()
        cohere = await app.http.post("/v2/embed", json={"texts": ["x"]},
                                     headers={"Origin": APP, "Authorization": f"Bearer {KEY}"})
        assert cohere.status_code == 200 and cohere.headers["access-control-allow-origin"] == APP


async def test_other_origins_get_no_cors_headers() -> None:
    async with fake_app(api_keys=[KEY], cors_allow_origins=[APP]) as app:
        preflight = await _preflight(app.http, OTHER)
        assert preflight.status_code == 400 and "access-control-allow-origin" not in preflight.headers
        answer = await app.http.post("/v1/embeddings", json={"input": "x"},
                                     headers={"Origin": OTHER, "Authorization": f"Bearer {KEY}"})
        assert "access-control-allow-origin" not in answer.headers  # the browser will not hand it to the page


async def test_any_origin() -> None:
    async with fake_app(cors_allow_origins="*") as app:
        preflight = await _preflight(app.http, OTHER)
        assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == "*"


def test_an_origin_with_a_path_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="is not an origin"):
        make_settings(cors_allow_origins="https://app.example.com/page")
    assert make_settings(cors_allow_origins='["https://a.example", "http://localhost:3000"]').cors_allow_origins == [
        "https://a.example", "http://localhost:3000"]
    assert EmbeddingConfig.model_fields["cors_allow_origins"].get_default(call_default_factory=True) == []
