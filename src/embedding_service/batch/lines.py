"""A batch input file, line by line: the whole file is checked before any line runs (never half a batch),
and the runner reads it again from any line on.

A line is `{"custom_id": str, "method": "POST", "url": <the batch's endpoint>, "body": {...}}`. Blank lines
are skipped and not counted. A problem with a line's shape fails the batch at validation, each bad line
named as OpenAI names them (`errors.data[].line`, 1-based); a body the endpoint would refuse is not a shape
problem: that line runs and gets the endpoint's own 4xx in the error file.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

__all__ = ["ENDPOINTS", "MAX_REPORTED_ERRORS", "BatchLine", "LineError", "line_limit", "read_lines", "validate_file"]

ENDPOINTS = ("/v1/embeddings", "/v2/embed", "/v1/rerank", "/v2/rerank", "/v1/score", "/embed_sparse")
MAX_REPORTED_ERRORS = 100  # a file of a million bad lines reports the first hundred, then a count
_LINE_OVERHEAD = 4096  # a line is its body plus custom_id, method and url
_MAX_CUSTOM_ID = 512


def line_limit(max_body_bytes: int) -> int:
    """The longest line a batch input file may hold: the largest body the endpoint takes, and the rest."""
    return max_body_bytes + _LINE_OVERHEAD


@dataclass(frozen=True)
class LineError:
    code: str
    message: str
    line: int | None = None  # 1-based line number in the file
    param: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


@dataclass(frozen=True)
class BatchLine:
    index: int  # 0-based among the file's requests (blank lines not counted)
    custom_id: str
    body: bytes  # the request body as JSON


def _raw_lines(path: Path, max_line_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(1-based line number, the line without its newline), None for a line over `max_line_bytes`."""
    with path.open("rb") as source:
        number = 0
        while True:
            raw = source.readline(max_line_bytes + 2)
            if not raw:
                return
            number += 1
            if len(raw) == max_line_bytes + 2 and not raw.endswith(b"\n"):
                while raw and not raw.endswith(b"\n"):  # skip the rest of the long line, in bounded reads
                    raw = source.readline(1 << 20)
                yield number, None
                continue
            line = raw.rstrip(b"\r\n")
            yield number, (line if len(line) <= max_line_bytes else None)


def _check(raw: bytes, number: int, endpoint: str) -> tuple[BatchLine | None, LineError | None]:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return None, LineError("invalid_json_line", f"line {number} is not valid JSON: {exc}", number)
    if not isinstance(data, dict):
        return None, LineError("invalid_json_line", f"line {number} is not a JSON object", number)
    custom_id = data.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > _MAX_CUSTOM_ID:
        return None, LineError("invalid_custom_id", f"line {number}: 'custom_id' must be a non-empty string of at "
                               f"most {_MAX_CUSTOM_ID} characters", number, "custom_id")
    if data.get("method") != "POST":
        return None, LineError("invalid_method", f"line {number}: 'method' must be \"POST\"", number, "method")
    if data.get("url") != endpoint:
        return None, LineError("invalid_url", f"line {number}: 'url' must be the batch's endpoint '{endpoint}', "
                               f"got {str(data.get('url'))[:100]!r}", number, "url")
    body = data.get("body")
    if not isinstance(body, dict):
        return None, LineError("invalid_body", f"line {number}: 'body' must be a JSON object", number, "body")
    extra = sorted(set(data) - {"custom_id", "method", "url", "body"})
    if extra:
        return None, LineError("invalid_json_line", f"line {number}: unknown field '{extra[0][:50]}'", number,
                               extra[0][:50])
    return BatchLine(-1, custom_id, orjson.dumps(body)), None


def validate_file(path: Path, endpoint: str, *, max_lines: int, max_line_bytes: int
                  ) -> tuple[int, list[LineError]]:
    """(requests in the file, the problems found: at most MAX_REPORTED_ERRORS, then one summary)."""
    errors: list[LineError] = []
    found = 0
    seen: set[str] = set()
    count = 0
    for number, raw in _raw_lines(path, max_line_bytes):
        problem: LineError | None = None
        if raw is None:
            problem = LineError("line_too_large", f"line {number} is over {max_line_bytes} bytes", number)
        elif raw.strip():
            count += 1
            line, problem = _check(raw, number, endpoint)
            if line is not None:
                if line.custom_id in seen:
                    problem = LineError("duplicate_custom_id", f"line {number}: custom_id "
                                        f"{line.custom_id[:100]!r} appears on an earlier line", number, "custom_id")
                seen.add(line.custom_id)
        if problem is not None:
            found += 1
            if len(errors) < MAX_REPORTED_ERRORS:
                errors.append(problem)
        if count > max_lines:
            errors.append(LineError("too_many_requests", f"the file holds more than {max_lines} requests, the "
                                    "most one batch may hold; split it into several batches"))
            return count, errors
    if found > len(errors):
        errors.append(LineError("too_many_errors", f"{found} lines have errors; the first "
                                f"{MAX_REPORTED_ERRORS} are listed"))
    if count == 0 and not errors:
        errors.append(LineError("empty_file", "the input file holds no requests"))
    return count, errors


def read_lines(path: Path, endpoint: str, *, start: int, max_line_bytes: int) -> Generator[BatchLine, None, None]:
    """The requests of a validated file from the `start`-th (0-based) on."""
    index = 0
    for number, raw in _raw_lines(path, max_line_bytes):
        if raw is None or not raw.strip():
            continue
        if index >= start:
            line, problem = _check(raw, number, endpoint)
            if line is None:  # the file changed since it was validated: files are never written twice
                raise ValueError(problem.message if problem else f"line {number} is invalid")
            yield BatchLine(index, line.custom_id, line.body)
        index += 1
