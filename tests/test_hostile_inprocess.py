"""Hostile input that needs no server process (issue 12): fail-closed key configuration, log injection,
HEAD /health, and the connection guard's bookkeeping."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from embedding_service.api.security import load_key_digests
from embedding_service.cli import load_settings
from embedding_service.logging_config import RequestIdFilter, TextFormatter
from embedding_service.server import accept_backlog, refuse_new_handshakes

from .conftest import make_settings


@pytest.mark.parametrize("value", [" , ", ",", "[\" \"]", " ,, , "])
def test_keys_configured_but_none_parse_refuse_to_start(value: str) -> None:
    # Before: authentication silently off, everyone served.
    with pytest.raises(ValidationError, match="holds no API key"):
        make_settings(api_keys=value)


@pytest.mark.parametrize("value", ["", "   ", "[]"])
def test_no_keys_at_all_still_means_no_authentication(value: str) -> None:
    assert make_settings(api_keys=value).api_keys == []


@pytest.mark.parametrize("key", ["has space", "kéy-non-ascii", "tab\tkey", "nul\x00key"])
def test_keys_no_client_could_send_are_refused_at_start(key: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValidationError, match="visible ASCII"):
        make_settings(api_keys=[key])
    with pytest.raises(SystemExit) as exited:
        load_settings({"engine": "fake", "api_keys": f"ok-key,{key}"})
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--api-keys" in err and key not in err  # one line, the key not echoed


def test_key_file_of_comments_only_refuses_to_start(tmp_path: Path) -> None:
    path = tmp_path / "keys.txt"
    path.write_text("# keys go here\n\n   \n# sk-not-a-key\n")
    with pytest.raises(ValueError, match="holds no API key") as info:
        load_key_digests([], str(path))
    assert "\n" not in str(info.value) and "api_key_file" in str(info.value)  # the CLI prints it as one line


def test_key_file_line_with_a_space_is_refused_with_its_line_number(tmp_path: Path) -> None:
    path = tmp_path / "keys.txt"
    path.write_text("good-key\nbad key\n")
    with pytest.raises(ValueError, match=r"keys.txt:2: .*visible ASCII") as info:
        load_key_digests([], str(path))
    assert "bad key" not in str(info.value)


def _text_log() -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(TextFormatter("%(levelname)s [%(request_id)s]: %(message)s"))
    logger = logging.getLogger("embedding_service")
    logger.addHandler(handler)
    return logger, stream


async def test_refused_path_cannot_forge_log_lines(client: httpx.AsyncClient) -> None:
    logger, stream = _text_log()
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        from embedding_service.api.app import create_app
        from embedding_service.engine.engine import EmbeddingEngine

        engine: EmbeddingEngine = client._transport.app.state.engine  # type: ignore[attr-defined]
        app = create_app(make_settings(engine="fake", api_keys="sk-right"), engine)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            response = await http.get("/v1/models%0AINFO%20[-]:%20forged%20line%00%E2%80%A8x")
        assert response.status_code == 401
    finally:
        logger.handlers = [h for h in logger.handlers if h.stream is not stream]  # type: ignore[attr-defined]
        logger.setLevel(level)
    text = stream.getvalue()
    lines = [line for line in text.splitlines() if line]
    refused = [line for line in lines if "refused" in line]
    assert len(refused) == 1, text
    assert "\\n" in refused[0] and "\\x00" in refused[0] and "\\u2028" in refused[0]  # escaped, on one line
    assert not any(line.startswith("INFO [-]: forged") for line in lines)
    assert "\x00" not in text


def test_tracebacks_keep_their_lines() -> None:
    logger, stream = _text_log()
    try:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logger.error("failed\nsecond", exc_info=True)
    finally:
        logger.handlers = [h for h in logger.handlers if h.stream is not stream]  # type: ignore[attr-defined]
    text = stream.getvalue()
    assert "failed\\nsecond" in text and "Traceback (most recent call last):\n" in text


async def test_head_health(client: httpx.AsyncClient) -> None:
    response = await client.head("/health")
    assert response.status_code == 200 and response.content == b""


def test_listener_helpers_on_a_plain_socket() -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0), backlog=8) as listener:
        port = listener.getsockname()[1]
        first = socket.create_connection(("127.0.0.1", port))
        assert accept_backlog([listener]) == 1  # accepted by the kernel, not yet by the server
        assert refuse_new_handshakes([listener])
        second = socket.socket()
        second.settimeout(0.3)
        with pytest.raises(TimeoutError):  # SYN dropped: never accepted
            second.connect(("127.0.0.1", port))
        conn, _ = listener.accept()
        assert accept_backlog([listener]) == 0
        first.sendall(b"ping")
        assert conn.recv(4) == b"ping"  # connections already accepted are untouched
        for sock in (first, second, conn):
            sock.close()
