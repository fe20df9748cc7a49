"""Every bad request gets a 4xx in the OpenAI envelope with a message a person can act on, and the server
keeps serving. The table runs in-process on the fake engine; a subset that needs raw bytes on the wire
(invalid UTF-8, oversized and chunked bodies, wrong content type, malformed JSON) runs against a real
server process too.
"""

from __future__ import annotations

import http.client
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest

from .conftest import ServerProcess
from .fidelity_support import DIM, JSON, MAX_BODY, MAX_LEN, MAX_TOKENS, fake_client, words


@dataclass
class Case:
    name: str
    json: Any = None
    body: bytes | None = None  # raw bytes win over `json`
    status: int = 400
    param: str | None = None
    words: tuple[str, ...] = ()  # each must appear in the message (case-insensitive)
    headers: dict[str, str] = field(default_factory=lambda: dict(JSON))
    method: str = "POST"
    path: str = "/v1/embeddings"
    code: str | None = None

    def content(self) -> bytes:
        return self.body if self.body is not None else orjson.dumps(self.json)


CASES = [
    # --- the body itself ---------------------------------------------------------------------------
    Case("empty body", body=b"", words=("empty",)),
    Case("malformed json", body=b'{"input": ', words=("not valid json",)),
    Case("trailing garbage", body=b'{"input": "a"} x', words=("not valid json",)),
    Case("single quotes", body=b"{'input': 'a'}", words=("not valid json",)),
    Case("nan literal", body=b'{"input": NaN}', words=("not valid json",)),
    Case("body is a list", json=["hello"], words=("json object", "list")),
    Case("body is a string", json="hello", words=("json object", "str")),
    Case("invalid utf-8 bytes", body=b'{"input": "caf\xe9 \xff"}', words=("utf-8",)),
    Case("lone low surrogate escape", body=b'{"input": ["ok", "\\udc00"]}', words=("surrogate",)),
    Case("truncated utf-8 sequence", body=b'{"input": "\xe6\x9d"}', words=("utf-8",)),
    Case("lone surrogate escape", body=b'{"input": "a \\ud800 b"}', words=("surrogate",)),
    Case("lone surrogate at the end", body=b'{"input": "a \\ud800"}', words=("surrogate",)),
    Case("truncated after a surrogate pair", body=b'{"input": "\\ud83d\\ude00', words=("not valid json",)),
    Case(
        "text/plain content type",
        body=b'{"input": "a"}',
        headers={"content-type": "text/plain"},
        status=415,
        words=("application/json", "text/plain"),
        code="unsupported_media_type",
    ),
    Case(
        "form content type (curl without -H)",
        body=b'{"input": "a"}',
        headers={"content-type": "application/x-www-form-urlencoded"},
        status=415,
        words=("application/json", "curl"),
    ),
    Case(
        "body over the size limit",
        body=b'{"input": "' + b"a" * MAX_BODY + b'"}',
        status=413,
        words=("limit", str(MAX_BODY)),
        code="payload_too_large",
    ),
    # --- input ---------------------------------------------------------------------------------------
    Case("missing input", json={"model": "m"}, param="input", words=("'input' is required",)),
    Case("input null", json={"input": None}, param="input", words=("required",)),
    Case("input number", json={"input": 5}, param="input", words=("must be a string", "int")),
    Case("input object", json={"input": {"text": "a"}}, param="input", words=("must be a string", "dict")),
    Case("input boolean", json={"input": True}, param="input", words=("must be a string", "bool")),
    Case("empty string", json={"input": ""}, param="input", words=("empty string",)),
    Case("empty list", json={"input": []}, param="input", words=("empty list",)),
    Case("empty string in list", json={"input": ["a", ""]}, param="input", words=("input[1]", "empty")),
    Case("number among strings", json={"input": ["a", 1]}, param="input", words=("input[1]", "int")),
    Case("null among strings", json={"input": ["a", None]}, param="input", words=("input[1]", "nonetype")),
    Case("list of objects", json={"input": [{"text": "a"}]}, param="input", words=("input[0]", "dict")),
    Case("list of floats", json={"input": [1.5, 2.0]}, param="input", words=("input[0]", "float")),
    Case("string among token ids", json={"input": [1, "a"]}, param="input", words=("only integers",)),
    Case("boolean token id", json={"input": [1, True]}, param="input", words=("only integers",)),
    Case("empty token list", json={"input": [[]]}, param="input", words=("input[0]", "empty token list")),
    Case(
        "bad inner token list",
        json={"input": [[1, 2], [3, "x"]]},
        param="input",
        words=("input[1]", "integer token ids"),
    ),
    Case("mixed ids and lists", json={"input": [[1], 2]}, param="input", words=("input[1]",)),
    Case(
        "negative token id",
        json={"input": [5, -1]},
        param="input",
        words=("input[1]", "-1", "vocabulary"),
        code="invalid_token_id",
    ),
    Case(
        "token id past the vocabulary",
        json={"input": [[5], [6, 7, 99_999_999]]},
        param="input",
        words=("input[1][2]", "99999999", "0..31999"),
    ),
    Case(
        "huge integer token id",
        body=b'{"input": [[5, 1000000000000000000000000000000]]}',  # (decoded exactly, not as a float)
        param="input",
        words=("input[0][1]", "1000000000000000000000000000000", "vocabulary"),
    ),
    Case("NUL character", json={"input": "a\u0000b"}, param="input", words=("nul",)),
    Case("too many inputs", json={"input": ["a"] * 2049}, param="input", words=("2049", "2048")),
    Case(
        "input over the token limit",
        json={"input": ["ok", words(MAX_LEN + 6)]},
        param="input",
        words=("input[1]", str(MAX_LEN + 7), str(MAX_LEN), "truncate"),
        code="context_length_exceeded",
    ),
    Case(
        "token-id input over the limit",
        json={"input": list(range(10, 10 + MAX_LEN + 1))},
        param="input",
        words=(str(MAX_LEN + 2), str(MAX_LEN)),
    ),
    Case(
        "request over the total token cap",
        json={"input": [words(60)] * 90},
        param="input",
        words=("5490", str(MAX_TOKENS), "split"),
    ),
    Case(
        "instruction with token ids",
        json={"input": [5, 6], "instruction": "Find"},
        param="instruction",
        words=("text input only",),
    ),
    Case(
        "prompt_name with token ids",
        json={"input": [[5, 6]], "prompt_name": "query"},
        param="prompt_name",
        words=("text input only",),
    ),
    # --- options -----------------------------------------------------------------------------------------
    Case(
        "encoding_format float16",
        json={"input": "a", "encoding_format": "float16"},
        param="encoding_format",
        words=("one of float, int8", "float16"),
    ),
    Case(
        "encoding_format empty",
        json={"input": "a", "encoding_format": ""},
        param="encoding_format",
        words=("one of float, int8, uint8, binary, ubinary, base64",),
    ),
    Case(
        "encoding_format number",
        json={"input": "a", "encoding_format": 1},
        param="encoding_format",
        words=("string",),
    ),
    Case(
        "dimensions as string",
        json={"input": "a", "dimensions": "32"},
        param="dimensions",
        words=("integer", '"32"'),
    ),
    Case(
        "dimensions as float", json={"input": "a", "dimensions": 32.5}, param="dimensions", words=("integer",)
    ),
    Case(
        "dimensions as bool", json={"input": "a", "dimensions": True}, param="dimensions", words=("integer",)
    ),
    Case("dimensions zero", json={"input": "a", "dimensions": 0}, param="dimensions", words=("positive",)),
    Case(
        "dimensions negative", json={"input": "a", "dimensions": -8}, param="dimensions", words=("positive",)
    ),
    Case(
        "dimensions below range",
        json={"input": "a", "dimensions": 16},
        param="dimensions",
        words=("between 32 and 64", "16"),
    ),
    Case(
        "dimensions above range",
        json={"input": "a", "dimensions": 65},
        param="dimensions",
        words=("between 32 and 64", "65"),
    ),
    Case("truncate as string", json={"input": "a", "truncate": "yes"}, param="truncate", words=("boolean",)),
    Case("model not a string", json={"input": "a", "model": 5}, param="model", words=("string",)),
    Case("user not a string", json={"input": "a", "user": ["u"]}, param="user", words=("string",)),
    Case(
        "empty instruction", json={"input": "a", "instruction": "  "}, param="instruction", words=("empty",)
    ),
    Case(
        "instruction not a string",
        json={"input": "a", "instruction": 3},
        param="instruction",
        words=("string",),
    ),
    Case(
        "instruction and prompt_name",
        json={"input": "a", "instruction": "x", "prompt_name": "query"},
        param="prompt_name",
        words=("either",),
    ),
    Case(
        "unknown prompt_name",
        json={"input": "a", "prompt_name": "nope"},
        param="prompt_name",
        words=("unknown prompt_name", "nope"),
    ),
    # --- routing -----------------------------------------------------------------------------------------
    Case("GET on embeddings", method="GET", status=405, words=("get", "not allowed")),
    Case("PUT on health", method="PUT", path="/health", status=405, words=("put", "/health")),
    Case("unknown route", path="/v1/embedding", json={"input": "a"}, status=404, words=("/v1/embedding",)),
    Case(
        "unknown model card",
        method="GET",
        path="/v1/models/gpt-4",
        status=404,
        param="model",
        words=("gpt-4", "fake-model"),
    ),
]


def check_error(case: Case, response: httpx.Response) -> None:
    assert response.status_code == case.status, (case.name, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and isinstance(error["code"], str) and error["code"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == case.param, (case.name, error)
    message = error["message"].lower()
    for word in case.words:
        assert word.lower() in message, (case.name, error["message"])
    if case.code is not None:
        assert error["code"] == case.code


@pytest.fixture
async def bad_client() -> AsyncIterator[httpx.AsyncClient]:
    async with fake_client() as http:
        yield http


async def assert_serves(http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/embeddings", json={"input": ["still", "serving"]})
    assert response.status_code == 200, response.text
    assert len(response.json()["data"]) == 2


def test_table_is_large_enough() -> None:
    assert len(CASES) >= 40
    assert len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
async def test_bad_request(bad_client: httpx.AsyncClient, case: Case) -> None:
    content = None if case.method == "GET" else case.content()
    response = await bad_client.request(case.method, case.path, content=content, headers=case.headers)
    check_error(case, response)
    await assert_serves(bad_client)


async def test_405_keeps_allow_header(bad_client: httpx.AsyncClient) -> None:
    response = await bad_client.get("/v1/embeddings")
    assert response.status_code == 405
    assert "POST" in response.headers.get("allow", "")


async def test_dimensions_refused_on_a_model_that_is_not_matryoshka() -> None:
    async with fake_client(matryoshka=False, name="plain-model") as http:
        response = await http.post("/v1/embeddings", json={"input": "a", "dimensions": 32})
        expected = Case("not matryoshka", param="dimensions", words=("not a matryoshka", str(DIM)))
        check_error(expected, response)
        same = await http.post("/v1/embeddings", json={"input": "a", "dimensions": DIM})
        assert same.status_code == 200 and len(same.json()["data"][0]["embedding"]) == DIM


# --- the same kinds of abuse on the wire, against a real server process ------------------------------------
def raw_request(port: int, method: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, orjson.loads(response.read())
    finally:
        connection.close()


WIRE_CASES = [
    case
    for case in CASES
    if case.name
    in {
        "empty body",
        "malformed json",
        "invalid utf-8 bytes",
        "lone surrogate escape",
        "text/plain content type",
        "form content type (curl without -H)",
        "body over the size limit",
        "empty list",
        "token id past the vocabulary",
        "encoding_format float16",
        "dimensions above range",
        "GET on embeddings",
        "unknown route",
        "input over the token limit",
    }
]


@pytest.mark.slow
def test_bad_requests_on_the_wire(server_factory: type[ServerProcess]) -> None:
    assert len(WIRE_CASES) == 14
    server = server_factory(
        [
            "--engine",
            "fake",
            "--served-model-name",
            "fake-model",
            "--max-model-len",
            str(MAX_LEN),
            "--max-body-bytes",
            str(MAX_BODY),
        ]
    )
    server.wait_healthy(60)
    for case in WIRE_CASES:
        body = b"" if case.method == "GET" else case.content()
        status, payload = raw_request(server.port, case.method, case.path, body, case.headers)
        check_error(case, httpx.Response(status, json=payload))
    # A declared size over the limit is refused before the body is read.
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 999999999\r\n\r\n{"input":'
        )
        head = sock.recv(65536).decode("latin-1")
        assert head.startswith("HTTP/1.1 413"), head
    # A chunked body (no Content-Length) is cut off at the limit while streaming.
    chunks = (b'{"input": "' + b"a" * 8192 for _ in range(10))
    response = httpx.post(server.url + "/v1/embeddings", content=chunks, headers=JSON, timeout=30)
    check_error(Case("chunked too large", status=413, words=("limit",)), response)
    good = httpx.post(server.url + "/v1/embeddings", json={"input": ["still", "serving"]}, timeout=30)
    assert good.status_code == 200 and len(good.json()["data"]) == 2
    assert server.proc.poll() is None
