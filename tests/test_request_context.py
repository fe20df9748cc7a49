"""Request ids (echoed or generated) and timing headers on every response; ids in logs; JSON log lines."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import sys
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from embedding_service.api.middleware.request_context import RequestContextMiddleware
from embedding_service.cli import build_parser
from embedding_service.errors import ErrorKind, ServiceError, send_error
from embedding_service.logging_config import JsonFormatter, RequestIdFilter, configure_logging

from .conftest import make_settings

EMBED = "/v1/embeddings"
HEX_ID = re.compile(r"[0-9a-f]{32}")


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", EMBED, {"input": ["hello world"]}, 200),
        ("POST", EMBED, {"input": 5}, 400),
        ("GET", "/health", None, 200),
        ("GET", "/nowhere", None, 404),
        ("GET", "/metrics", None, 200),
    ],
)
async def test_client_request_id_is_echoed(client: httpx.AsyncClient, method: str, path: str, body: object,
                                           status: int) -> None:
    response = await client.request(method, path, json=body, headers={"X-Request-Id": "trace-42.a:b"})
    assert response.status_code == status
    assert response.headers["x-request-id"] == "trace-42.a:b"
    assert len(response.headers.get_list("x-request-id")) == 1
    assert float(response.headers["x-total-time-ms"]) >= 0.0


async def test_request_id_is_generated_when_missing(client: httpx.AsyncClient) -> None:
    first = await client.post(EMBED, json={"input": "a"})
    second = await client.post(EMBED, json={"input": "a"})
    ids = [first.headers["x-request-id"], second.headers["x-request-id"]]
    assert all(HEX_ID.fullmatch(value) for value in ids)
    assert ids[0] != ids[1]


@pytest.mark.parametrize("bad", ["has space", "x" * 129, "quote\"d", "semi;colon", ""])
async def test_unsafe_client_ids_are_replaced(client: httpx.AsyncClient, bad: str) -> None:
    response = await client.get("/health", headers={"X-Request-Id": bad})
    assert HEX_ID.fullmatch(response.headers["x-request-id"])


async def test_embeddings_carry_all_timing_headers(client: httpx.AsyncClient) -> None:
    response = await client.post(EMBED, json={"input": ["timing"]})
    assert response.status_code == 200
    queue = float(response.headers["x-queue-time-ms"])
    inference = float(response.headers["x-inference-time-ms"])
    total = float(response.headers["x-total-time-ms"])
    assert min(queue, inference) >= 0.0
    assert total >= inference  # the total includes the inference it reports


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.addFilter(RequestIdFilter())
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_log_records_carry_the_request_id(client: httpx.AsyncClient) -> None:
    handler = _Records()
    logger = logging.getLogger("embedding_service")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        response = await client.post(EMBED, json={"input": ["x", "y"]}, headers={"X-Request-Id": "req-7"})
        assert response.status_code == 200
        logger.info("outside any request")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    by_message = {record.getMessage(): record for record in handler.records}
    assert by_message["Processing 2 texts for embedding"].request_id == "req-7"  # type: ignore[attr-defined]
    assert any(message.startswith("Generated 2 embeddings") and record.request_id == "req-7"  # type: ignore[attr-defined]
               for message, record in by_message.items())
    assert by_message["outside any request"].request_id == "-"  # type: ignore[attr-defined]


def test_json_formatter_writes_one_parseable_object_per_line() -> None:
    record = logging.LogRecord("embedding_service", logging.WARNING, __file__, 1, "queue at %d%%", (93,),
                               None)
    record.request_id = "abc"
    record.batch = 7  # passed with extra=...: kept as a field
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "queue at 93%"
    assert entry["level"] == "WARNING"
    assert entry["logger"] == "embedding_service"
    assert entry["request_id"] == "abc"
    assert entry["batch"] == 7
    assert "RuntimeError: boom" in entry["exception"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", entry["ts"])


def test_configure_logging_json_end_to_end(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        configure_logging("INFO", "json")
        logging.getLogger("embedding_service").info("hello %s", "json")
        logging.getLogger("uvicorn.error").warning("from uvicorn")
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(e["logger"], e["message"]) for e in lines] == [("embedding_service", "hello json"),
                                                           ("uvicorn.error", "from uvicorn")]
    assert all("request_id" not in e for e in lines)  # outside a request


def test_log_format_is_a_config_field_and_flag() -> None:
    assert make_settings().log_format == "text"
    assert make_settings(log_format="json").log_format == "json"
    with pytest.raises(ValidationError):
        make_settings(log_format="xml")
    args = build_parser().parse_args(["serve", "--log-format", "json"])
    assert args.log_format == "json"


def test_log_format_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBEDDING_LOG_FORMAT", "json")
    assert make_settings().log_format == "json"


async def _call(middleware: Any, headers: list[tuple[bytes, bytes]] | None = None) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/x", "headers": headers or []}
    await middleware(scope, receive, send)
    return sent


async def test_middleware_reports_failures_and_disconnects() -> None:
    seen: list[tuple[str, str, int, str | None]] = []

    def observer(route: str, method: str, status: int, _seconds: float, kind: str | None) -> None:
        seen.append((route, method, status, kind))

    async def crashing(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("bug")

    async def abandoned(scope: Any, receive: Any, send: Any) -> None:
        raise asyncio.CancelledError

    async def answering(scope: Any, receive: Any, send: Any) -> None:
        assert dict(scope["headers"])[b"x-request-id"] == b"given-1"  # handlers see the id
        await send({"type": "http.response.start", "status": 204,
                    "headers": [(b"x-request-id", b"spoofed"), (b"x-other", b"1")]})
        await send({"type": "http.response.body", "body": b""})

    async def refusing(scope: Any, receive: Any, send: Any) -> None:  # a 503 of one kind among several
        await asyncio.create_task(send_error(send, ServiceError(ErrorKind.OVERLOADED, "busy")))

    with pytest.raises(RuntimeError):
        await _call(RequestContextMiddleware(crashing, observer))
    with pytest.raises(asyncio.CancelledError):
        await _call(RequestContextMiddleware(abandoned, observer))
    await _call(RequestContextMiddleware(refusing, observer))
    sent = await _call(RequestContextMiddleware(answering, observer), [(b"x-request-id", b"given-1")])
    assert seen == [("unmatched", "GET", 500, "internal"), ("unmatched", "GET", 499, "client_closed"),
                    ("unmatched", "GET", 503, "overloaded"), ("unmatched", "GET", 204, None)]
    headers = sent[0]["headers"]
    assert [v for k, v in headers if k == b"x-request-id"] == [b"given-1"]  # the app's own copy is replaced
    assert (b"x-other", b"1") in headers


def test_generated_ids_differ_across_a_fork() -> None:
    import os

    from embedding_service.api.middleware.request_context import new_request_id

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report one id and leave at once
        os.write(write, new_request_id().encode())
        os._exit(0)
    os.close(write)
    child_id = os.read(read, 64).decode()
    os.waitpid(pid, 0)
    os.close(read)
    parent_ids = {new_request_id() for _ in range(3)}
    assert HEX_ID.fullmatch(child_id)
    assert child_id[:16] not in {value[:16] for value in parent_ids}
