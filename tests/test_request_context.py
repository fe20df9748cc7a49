"""Request ids (echoed or generated) and timing headers on every response; ids in logs; JSON log lines."""

from __future__ import annotations

import io
import json
import logging
import re
import sys

import httpx
import pytest
from conftest import make_settings
from pydantic import ValidationError

from embedding_service.cli import build_parser
from embedding_service.logging_config import JsonFormatter, RequestIdFilter, configure_logging

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
