"""GET /metrics: text that prometheus-client's own parser reads, and counters that follow traffic."""

from __future__ import annotations

import asyncio
import math

import httpx
from prometheus_client.parser import text_string_to_metric_families

from embedding_service.backends.fake.embed import FakeBackend
from embedding_service.engine.engine import EmbeddingEngine

from .conftest import engine_options, fake_app, fake_app_over, in_process_client

EMBED = "/v1/embeddings"
M = "fake-model"  # the served name of conftest's fake app


async def scrape(http: httpx.AsyncClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of /metrics as {(name, labels): value}, parsed by prometheus-client's parser."""
    response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    """A sample's value; 0 for a labelled counter that has not been created yet."""
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_metrics_parse_and_expose_every_family(client: httpx.AsyncClient) -> None:
    await client.post(EMBED, json={"input": ["warm up"]})
    response = await client.get("/metrics")
    families = {family.name: family for family in text_string_to_metric_families(response.text)}
    expected = {
        "embedding_requests": "counter",
        "embedding_request_duration_seconds": "histogram",
        "embedding_queue_requests": "gauge",
        "embedding_queue_tokens": "gauge",
        "embedding_batch_size": "histogram",
        "embedding_batch_tokens": "histogram",
        "embedding_batch_compute_seconds": "histogram",
        "embedding_texts": "counter",
        "embedding_tokens": "counter",
        "embedding_model_load_seconds": "gauge",
        "embedding_engine_state": "gauge",
        "embedding_model_info": "gauge",
        "process_resident_memory_bytes": "gauge",
        "process_cpu_seconds": "counter",
        "python_info": "gauge",
    }
    for name, kind in expected.items():
        assert name in families, f"{name} missing from /metrics"
        assert families[name].type == kind, name
    samples = await scrape(client)
    # Every series of a model carries its served name (several models: one series each).
    assert value(samples, "embedding_engine_state", model=M, state="healthy") == 1.0
    assert value(samples, "embedding_engine_state", model=M, state="loading") == 0.0
    assert value(samples, "embedding_model_load_seconds", model=M) >= 0.0
    assert value(samples, "embedding_model_info", model=M, engine="fake", device="cpu",
                 dtype="float32", dimension="64", max_model_len="64") == 1.0


async def test_counters_move_with_traffic(client: httpx.AsyncClient) -> None:
    before = await scrape(client)
    prompt_tokens = 0
    for texts in (["one two three"], ["a", "b c"], ["x y z w", "q", "r s"]):
        response = await client.post(EMBED, json={"input": texts})
        assert response.status_code == 200
        prompt_tokens += response.json()["usage"]["prompt_tokens"]
    bad = await client.post(EMBED, json={"input": []})
    assert bad.status_code == 400
    missing = await client.get("/no/such/page")
    assert missing.status_code == 404
    after = await scrape(client)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("embedding_requests_total", route=EMBED, method="POST", status="200") == 3
    assert delta("embedding_requests_total", route=EMBED, method="POST", status="400") == 1
    # Unknown paths share one label value: a scanner cannot blow up the series count.
    assert delta("embedding_requests_total", route="unmatched", method="GET", status="404") == 1
    assert delta("embedding_request_duration_seconds_count", route=EMBED) == 4
    assert delta("embedding_request_duration_seconds_sum", route=EMBED) > 0
    assert delta("embedding_texts_total", model=M) == 6
    assert delta("embedding_tokens_total", model=M) == prompt_tokens
    assert delta("embedding_batch_size_sum", model=M) == 6
    assert delta("embedding_batch_tokens_sum", model=M) == prompt_tokens
    batches = delta("embedding_batch_size_count", model=M)
    assert 1 <= batches <= 6
    assert delta("embedding_batch_compute_seconds_count", model=M) == batches
    # Histogram buckets are cumulative and end with +Inf == count.
    inf_bucket = value(after, "embedding_batch_size_bucket", model=M, le="+Inf")
    assert inf_bucket == value(after, "embedding_batch_size_count", model=M) > 0
    assert value(after, "embedding_queue_requests", model=M) == 0
    assert value(after, "embedding_queue_tokens", model=M) == 0


async def test_queue_depth_is_read_live() -> None:
    backend = FakeBackend(dimension=8, max_model_len=64, delay_s=0.3)
    engine = EmbeddingEngine(backend, engine_options(max_model_len=64, batch_timeout_ms=0, max_batch_size=1))
    await engine.start()
    app = fake_app_over(engine)
    try:
        async with in_process_client(app) as http:
            requests = [asyncio.create_task(http.post(EMBED, json={"input": ["a b c"]})) for _ in range(3)]
            seen_requests = seen_tokens = 0.0
            for _ in range(200):  # bounded poll: stop once the queue shows or the requests finish
                samples = await scrape(http)
                seen_requests = max(seen_requests, value(samples, "embedding_queue_requests", model=M))
                seen_tokens = max(seen_tokens, value(samples, "embedding_queue_tokens", model=M))
                if seen_requests >= 2 or all(task.done() for task in requests):
                    break
                await asyncio.sleep(0.01)
            responses = await asyncio.gather(*requests)
            assert [r.status_code for r in responses] == [200, 200, 200]
            assert seen_requests >= 2
            assert seen_tokens >= 2 * 4  # "a b c" is 3 words + end-of-text
            idle = await scrape(http)
            assert value(idle, "embedding_queue_requests", model=M) == 0
    finally:
        await engine.stop()


async def test_apps_in_one_process_have_separate_registries() -> None:
    engines = [EmbeddingEngine(FakeBackend(dimension=8), engine_options(batch_timeout_ms=0)) for _ in range(2)]
    for engine in engines:
        await engine.start()
    apps = [fake_app_over(engine) for engine in engines]  # no duplicate-name error
    try:
        transports = [httpx.ASGITransport(app=app) for app in apps]
        async with httpx.AsyncClient(transport=transports[0], base_url="http://a") as first, \
                httpx.AsyncClient(transport=transports[1], base_url="http://b") as second:
            for _ in range(2):
                assert (await first.post(EMBED, json={"input": ["hello"]})).status_code == 200
            assert value(await scrape(first), "embedding_texts_total", model=M) == 2
            assert value(await scrape(second), "embedding_texts_total", model=M) == 0
    finally:
        for engine in engines:
            await engine.stop()


async def test_existing_batch_hook_keeps_working() -> None:
    engine = EmbeddingEngine(FakeBackend(dimension=8), engine_options(batch_timeout_ms=0))
    seen: list[tuple[int, int]] = []
    engine.on_batch = lambda size, tokens, _seconds: seen.append((size, tokens))
    await engine.start()
    app = fake_app_over(engine)
    try:
        async with in_process_client(app) as http:
            assert (await http.post(EMBED, json={"input": ["a b"]})).status_code == 200
            samples = await scrape(http)
        assert seen == [(1, 3)]
        assert value(samples, "embedding_tokens_total", model=M) == 3
    finally:
        await engine.stop()


async def test_loading_engine_reports_state_and_no_load_time() -> None:
    engine = EmbeddingEngine(FakeBackend(dimension=8), engine_options())  # never started: still loading
    app = fake_app_over(engine)
    async with in_process_client(app) as http:
        samples = await scrape(http)
    assert value(samples, "embedding_engine_state", model=M, state="loading") == 1.0
    assert not any(name == "embedding_model_load_seconds" for name, _ in samples)
    assert not any(name == "embedding_model_info" for name, _ in samples)
    assert not math.isnan(value(samples, "embedding_queue_requests", model=M))


async def test_metrics_route_counts_itself(client: httpx.AsyncClient) -> None:
    await client.get("/metrics")
    samples = await scrape(client)
    assert value(samples, "embedding_requests_total", route="/metrics", method="GET", status="200") == 1


async def test_internal_errors_are_counted_and_carry_the_request_id() -> None:
    """A backend failure becomes the error middleware's 500; the outer request middleware still sees it."""
    engine = EmbeddingEngine(FakeBackend(dimension=8, fail_batches=[0]), engine_options(batch_timeout_ms=0))
    await engine.start()
    app = fake_app_over(engine)
    try:
        async with in_process_client(app) as http:
            failed = await http.post(EMBED, json={"input": ["a"]}, headers={"X-Request-Id": "boom-1"})
            ok = await http.post(EMBED, json={"input": ["a"]})
            samples = await scrape(http)
    finally:
        await engine.stop()
    assert failed.status_code == 500
    assert failed.json()["error"]["type"]
    assert failed.headers["x-request-id"] == "boom-1"
    assert ok.status_code == 200
    assert value(samples, "embedding_requests_total", route=EMBED, method="POST", status="500") == 1
    assert value(samples, "embedding_requests_total", route=EMBED, method="POST", status="200") == 1
    assert value(samples, "embedding_texts_total", model=M) == 1  # the failed batch embedded nothing


async def test_errors_are_counted_by_kind_whichever_renderer_answered() -> None:
    """embedding_errors_total{route, kind}: the kind each error renderer answered with (a handler's, a
    middleware's, Cohere's envelope), so that 503s of different causes stay apart; one error for each 4xx/5xx
    request; a /health 503 (a state, not an error) is not one."""
    async with fake_app(start=False, api_keys=["sk-good"]) as loading:
        key = {"Authorization": "Bearer sk-good"}
        answers = [
            (await loading.http.post(EMBED, json={"input": ["a"]})).status_code,  # no key: middleware
            (await loading.http.post(EMBED, json={"input": ["a"]}, headers=key)).status_code,  # loading
            (await loading.http.get("/health")).status_code,
        ]
        loading_samples = await scrape(loading.http)
    assert answers == [401, 503, 503]
    async with fake_app() as served:
        answers = [
            (await served.http.post(EMBED, json={"input": []})).status_code,  # the engine's ServiceError
            (await served.http.post(EMBED, json={"inputs": "x"})).status_code,  # the validation handler
            (await served.http.get("/no/such/page")).status_code,  # the HTTP error handler
            (await served.http.post("/v2/embed", json={"texts": []})).status_code,  # Cohere's envelope
            (await served.http.post(EMBED, content=b"x", headers={"Content-Type": "text/plain"})).status_code,
        ]
        samples = await scrape(served.http)
    assert answers == [400, 400, 404, 400, 415]

    def errors(found: dict, **labels: str) -> float:
        return value(found, "embedding_errors_total", **labels)

    # (the API-key middleware answers before routing: the request counter's "unmatched" too)
    assert errors(loading_samples, route="unmatched", kind="authentication") == 1
    assert errors(loading_samples, route=EMBED, kind="not_ready") == 1
    assert errors(samples, route=EMBED, kind="invalid_request") == 2
    assert errors(samples, route="unmatched", kind="not_found") == 1
    assert errors(samples, route="/v2/embed", kind="invalid_request") == 1
    assert errors(samples, route=EMBED, kind="unsupported_media_type") == 1
    for found, health_503s in ((loading_samples, 1), (samples, 0)):
        failed = sum(v for (name, labels), v in found.items()
                     if name == "embedding_requests_total" and dict(labels)["status"] >= "400")
        counted = sum(v for (name, _), v in found.items() if name == "embedding_errors_total")
        assert counted == failed - health_503s
