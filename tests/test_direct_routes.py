"""The direct lane: the hot POST routes skip FastAPI's routing, and answer exactly as through it."""

from __future__ import annotations

import pytest
from fastapi.routing import APIRoute

from embedding_service.api.direct_routes import direct_routes

from .conftest import fake_app

_BODY = {"input": ["hello world", "second text"], "model": "fake-model"}


def _router_refuses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make FastAPI's route handling record every request it gets."""
    seen: list[str] = []
    original = APIRoute.handle

    async def handle(self, scope, receive, send):  # type: ignore[no-untyped-def]
        seen.append(f"{scope['method']} {self.path}")
        await original(self, scope, receive, send)

    monkeypatch.setattr(APIRoute, "handle", handle)
    return seen


async def test_the_post_routes_that_take_a_bare_request_are_direct() -> None:
    async with fake_app() as served:
        assert set(direct_routes(served.app.routes)) == {"/v1/embeddings", "/embeddings", "/v1/rerank",
                                                          "/rerank", "/v2/rerank", "/v1/score", "/v1/embed",
                                                          "/v2/embed", "/tokenize", "/detokenize", "/embed_sparse",
                                                          "/embed_all"}


@pytest.mark.parametrize("root_path", ["", "/api"])
async def test_embeddings_skip_the_router_and_answer_as_before(monkeypatch: pytest.MonkeyPatch,
                                                              root_path: str) -> None:
    seen = _router_refuses(monkeypatch)
    async with fake_app(root_path=root_path) as served:
        response = await served.http.post(f"{root_path}/v1/embeddings", json=_BODY)
        assert response.status_code == 200
        body = response.json()
        assert [row["index"] for row in body["data"]] == [0, 1] and len(body["data"][0]["embedding"]) == 64
        assert response.headers["x-request-id"] and float(response.headers["x-inference-time-ms"]) >= 0
        metrics = (await served.http.get(f"{root_path}/metrics")).text
    assert seen == ["GET /metrics"]  # the POST never reached FastAPI's routing
    assert 'route="/v1/embeddings"' in metrics  # labelled by its route, as the router labels it


async def test_errors_on_the_direct_lane_are_the_same_envelope(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _router_refuses(monkeypatch)
    async with fake_app() as served:
        bad = await served.http.post("/v1/embeddings", json={"input": [], "model": "fake-model"})
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
        wrong_type = await served.http.post("/v1/embeddings", content=b"{}", headers={"content-type": "text/plain"})
        assert wrong_type.status_code == 415 and "error" in wrong_type.json()
        assert seen == []
        # Not a direct request: through the router, as before.
        assert (await served.http.get("/v1/embeddings")).status_code == 405
        assert seen == ["GET /v1/embeddings"]  # (the route answers 405 for another method)
