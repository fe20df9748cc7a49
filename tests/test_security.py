"""API keys and rate limits, in process (ASGI transport over the fake engine)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from embedding_service.api.middleware import security
from embedding_service.api.middleware.ratelimit import RateLimiter, TokenBucket
from embedding_service.api.middleware.security import ApiKeyVerifier, key_digest, load_key_digests
from embedding_service.engine.engine import EmbeddingEngine

from .conftest import fake_app_over, in_process_client, make_settings

KEY_A = "sk-test-alpha-0123456789"
KEY_B = "sk-test-bravo-9876543210"
BODY = {"input": "hello world"}

ClientFactory = Callable[..., Any]


@pytest.fixture
async def make_client(fake_engine: EmbeddingEngine) -> AsyncIterator[ClientFactory]:
    opened: list[httpx.AsyncClient] = []

    def factory(**settings: object) -> httpx.AsyncClient:
        opened.append(in_process_client(fake_app_over(fake_engine, **settings)))
        return opened[-1]

    yield factory
    for http in opened:
        await http.aclose()


def assert_envelope(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    return error


# --- API keys --------------------------------------------------------------------------------------
async def test_right_key_passes_and_wrong_missing_malformed_get_401(make_client: ClientFactory) -> None:
    http = make_client(api_keys=[KEY_A, KEY_B])
    for key in (KEY_A, KEY_B):
        ok = await http.post("/v1/embeddings", json=BODY, headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200 and len(ok.json()["data"]) == 1
    cases = {
        "missing_api_key": {},
        "invalid_api_key": {"Authorization": "Bearer sk-test-alpha-012345678"},  # one character short
        "invalid_authorization_header": {"Authorization": f"Basic {KEY_A}"},
    }
    for code, headers in cases.items():
        refused = await http.post("/v1/embeddings", json=BODY, headers=headers)
        error = assert_envelope(refused, 401, code)
        assert error["type"] == "authentication_error"
        assert refused.headers["www-authenticate"].startswith("Bearer")
        assert KEY_A not in refused.text
    for malformed in ("Bearer", "Bearer ", f"Bearer {KEY_A} extra", KEY_A):
        refused = await http.post("/v1/embeddings", json=BODY, headers={"Authorization": malformed})
        assert_envelope(refused, 401, "invalid_authorization_header")


async def test_scheme_is_case_insensitive_and_every_route_but_health_is_protected(
    make_client: ClientFactory,
) -> None:
    http = make_client(api_keys=[KEY_A])
    ok = await http.post("/embeddings", json=BODY, headers={"Authorization": f"bearer {KEY_A}"})
    assert ok.status_code == 200
    for method, path in (("GET", "/v1/models"), ("GET", "/"), ("POST", "/embeddings"), ("GET", "/nowhere")):
        assert (await http.request(method, path)).status_code == 401, path
    assert (await http.get("/health")).status_code == 200
    assert (await http.get("/metrics")).status_code == 200


async def test_exempt_paths_are_configurable(make_client: ClientFactory) -> None:
    http = make_client(api_keys=[KEY_A], auth_exempt_paths=["/v1/models", "/docs*"])
    assert (await http.get("/health")).status_code == 401
    assert (await http.get("/v1/models")).status_code == 200
    assert (await http.get("/docs")).status_code == 200


async def test_key_file_with_plain_keys_and_hashes(make_client: ClientFactory, tmp_path: Path) -> None:
    key_file = tmp_path / "keys.txt"
    digest_b = hashlib.sha256(KEY_B.encode()).hexdigest()
    bare_hex_key = "ab" * 32  # 64 hex digits, like `openssl rand -hex 32`: a key, not a hash
    key_file.write_text(f"# team keys\n\n{KEY_A}\nsha256:{digest_b.upper()}\n{bare_hex_key}\n")
    http = make_client(api_key_file=str(key_file))
    for key in (KEY_A, KEY_B, bare_hex_key):
        response = await http.post("/v1/embeddings", json=BODY, headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 200, key
    # The digest itself is not a key.
    response = await http.post("/v1/embeddings", json=BODY, headers={"Authorization": f"Bearer {digest_b}"})
    assert response.status_code == 401


def test_bad_hash_line_and_missing_file_are_clear_errors(tmp_path: Path) -> None:
    bad = tmp_path / "keys.txt"
    bad.write_text("sha256:1234\n")
    with pytest.raises(ValueError, match=r"keys.txt:1: 'sha256:' must be followed by 64 hex digits"):
        load_key_digests([], str(bad))
    with pytest.raises(ValueError, match="does not exist or is not readable"):
        make_settings(api_key_file=str(tmp_path / "absent.txt"))


def test_env_accepts_json_list_and_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBEDDING_API_KEYS", f'["{KEY_A}", "{KEY_B}"]')
    assert make_settings().api_keys == [KEY_A, KEY_B]
    monkeypatch.setenv("EMBEDDING_API_KEYS", f"{KEY_A}, {KEY_B}")
    assert make_settings().api_keys == [KEY_A, KEY_B]


@pytest.mark.parametrize("presented", [KEY_A, KEY_B, "sk-wrong", ""])
def test_every_configured_digest_is_compared(monkeypatch: pytest.MonkeyPatch, presented: str) -> None:
    """No early exit: right key first, last or absent, compare_digest runs once per configured key,
    always on digests (fixed length), never on the raw keys."""
    keys = [KEY_A, "sk-c", "sk-d", KEY_B]
    verifier = ApiKeyVerifier(load_key_digests(keys, None))
    calls: list[tuple[bytes, bytes]] = []
    real = security.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", counting)
    found = verifier.identify(presented)
    assert len(calls) == len(keys)
    assert {b for _a, b in calls} == {key_digest(k) for k in keys}
    assert all(a == key_digest(presented) and len(a) == 32 for a, _b in calls)
    assert (found is not None) == (presented in keys)
    if found is not None:
        assert found == "key-" + key_digest(presented).hex()[:12]


async def test_keys_never_reach_the_log(make_client: ClientFactory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    http = make_client(api_keys=[KEY_A])
    await http.post("/v1/embeddings", json=BODY, headers={"Authorization": f"Bearer {KEY_A}"})
    await http.post("/v1/embeddings", json=BODY, headers={"Authorization": "Bearer sk-guess-1"})
    assert "refused" in caplog.text  # refusals are logged...
    assert KEY_A not in caplog.text and "sk-guess-1" not in caplog.text  # ...without the keys
    assert KEY_A not in repr(make_settings(api_keys=[KEY_A]))


# --- rate limits -----------------------------------------------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_allows_a_minute_burst_then_the_average_rate() -> None:
    bucket = TokenBucket(60, now=0.0)  # 1 a second
    assert all(bucket.take(1, 0.0) == 0.0 for _ in range(60))
    assert bucket.take(1, 0.0) == pytest.approx(1.0)
    assert bucket.take(1, 0.5) == pytest.approx(0.5)
    assert bucket.take(1, 1.0) == 0.0
    # A request bigger than a minute's allowance waits for a full bucket, then leaves it in debt.
    assert bucket.take(120, 1.0) == pytest.approx(60.0)
    assert bucket.take(120, 61.0) == 0.0
    assert bucket.take(1, 61.0) == pytest.approx(61.0)


def test_limiter_is_per_client_and_forgets_idle_clients() -> None:
    clock = FakeClock()
    limiter = RateLimiter(2, 0, clock=clock, max_clients=3)
    assert limiter.charge_request("a") == 0.0 and limiter.charge_request("a") == 0.0
    assert limiter.charge_request("a") > 0
    assert limiter.charge_request("b") == 0.0  # another client has its own bucket
    clock.now += 30
    assert limiter.charge_request("a") == 0.0  # refilled at 2 a minute
    clock.now += 60  # now a and b are full again: the same as unknown
    for client in ("c", "d"):
        assert limiter.charge_request(client) == 0.0
    assert set(limiter._requests) == {"c", "d"}  # the full buckets were forgotten to make room


async def test_request_limit_answers_429_with_retry_after(make_client: ClientFactory) -> None:
    http = make_client(rate_limit_rpm=3)
    statuses = [(await http.post("/v1/embeddings", json=BODY)).status_code for _ in range(3)]
    assert statuses == [200, 200, 200]
    refused = await http.post("/v1/embeddings", json=BODY)
    assert_envelope(refused, 429, "rate_limit_exceeded")
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(refused.headers["retry-after"]) <= 20
    assert (await http.get("/health")).status_code == 200  # exempt paths are not limited


async def test_limits_are_per_key(make_client: ClientFactory) -> None:
    http = make_client(api_keys=[KEY_A, KEY_B], rate_limit_rpm=1)
    a = {"Authorization": f"Bearer {KEY_A}"}
    b = {"Authorization": f"Bearer {KEY_B}"}
    assert (await http.post("/v1/embeddings", json=BODY, headers=a)).status_code == 200
    assert (await http.post("/v1/embeddings", json=BODY, headers=a)).status_code == 429
    assert (await http.post("/v1/embeddings", json=BODY, headers=b)).status_code == 200


async def test_token_limit_is_charged_after_tokenisation(
    make_client: ClientFactory, fake_engine: EmbeddingEngine
) -> None:
    http = make_client(rate_limit_tpm=10)  # the fake tokenizer: one token a word, plus end-of-text
    batches_before = len(fake_engine.backend.batches)  # type: ignore[attr-defined]
    ok = await http.post("/v1/embeddings", json={"input": "one two three four"})  # 5 tokens
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == 5
    assert (await http.post("/v1/embeddings", json={"input": "a b c d"})).status_code == 200  # 5 more
    refused = await http.post("/v1/embeddings", json={"input": "x"})
    assert_envelope(refused, 429, "rate_limit_exceeded")
    assert "tokens" in refused.json()["error"]["message"] and int(refused.headers["retry-after"]) >= 1
    # The refused request never reached the model.
    assert len(fake_engine.backend.batches) - batches_before == 2  # type: ignore[attr-defined]
