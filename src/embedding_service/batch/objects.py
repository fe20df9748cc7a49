"""OpenAI's object shapes for files, batches, lists and output lines; ids."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

import orjson

from .store import BatchRow, FileRow

__all__ = ["RETRY_STATUSES", "Answer", "answer_line", "batch_object", "file_object", "list_object", "new_batch_id",
           "new_file_id", "output_line", "request_ids"]


RETRY_STATUSES = (429, 503)  # overloaded, loading, draining: the line waits and runs again


@dataclass(frozen=True)
class Answer:
    """An endpoint's answer to a batch line."""

    status: int
    body: bytes
    content_type: str


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


def new_batch_id() -> str:
    return "batch_" + secrets.token_hex(16)


def request_ids(batch_id: str, index: int) -> tuple[str, str]:
    """(line id, request id) of a batch's line: derived, not random, so a run resumed after a crash writes
    exactly the lines an uninterrupted run would."""
    digest = hashlib.sha256(f"{batch_id}:{index}".encode()).hexdigest()
    return "batch_req_" + digest[:32], "req_" + digest[32:64]


def file_object(row: FileRow) -> dict[str, Any]:
    return {"id": row.id, "object": "file", "bytes": row.bytes, "created_at": row.created_at,
            "expires_at": row.expires_at, "filename": row.filename, "purpose": row.purpose,
            "status": "processed", "status_details": None}


def batch_object(row: BatchRow) -> dict[str, Any]:
    return {
        "id": row.id, "object": "batch", "endpoint": row.endpoint,
        "errors": orjson.loads(row.errors) if row.errors else None,
        "input_file_id": row.input_file_id, "completion_window": row.completion_window, "status": row.status,
        "output_file_id": row.output_file_id, "error_file_id": row.error_file_id,
        "created_at": row.created_at, "in_progress_at": row.in_progress_at, "expires_at": row.expires_at,
        "finalizing_at": row.finalizing_at, "completed_at": row.completed_at, "failed_at": row.failed_at,
        "expired_at": row.expired_at, "cancelling_at": row.cancelling_at, "cancelled_at": row.cancelled_at,
        "request_counts": {"total": row.total, "completed": row.completed, "failed": row.failed},
        "metadata": orjson.loads(row.metadata) if row.metadata else None,
    }


def list_object(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}


def output_line(line_id: str, custom_id: str, *, status: int | None = None, request_id: str | None = None,
                body: bytes | None = None, error: dict[str, Any] | None = None) -> bytes:
    """One line of an output or error file. `body` is the endpoint's JSON answer, kept byte for byte."""
    head = orjson.dumps({"id": line_id, "custom_id": custom_id})[:-1]
    if body is None:
        return head + b',"response":null,"error":' + orjson.dumps(error) + b"}\n"
    response = orjson.dumps({"status_code": status, "request_id": request_id})[:-1]
    return head + b',"response":' + response + b',"body":' + body + b'},"error":null}\n'


def answer_line(line_id: str, custom_id: str, *, status: int, request_id: str, body: bytes, content_type: str
                ) -> tuple[bool, bytes]:
    """(answered 2xx, the output or error file's line) for an endpoint's answer to a line."""
    if not content_type.startswith("application/json") or b"\n" in body or not body:
        try:  # (every endpoint answers one line of JSON; this only keeps the file JSONL if one did not)
            body = orjson.dumps(orjson.loads(body))
        except orjson.JSONDecodeError:
            body = orjson.dumps(body.decode("utf-8", "replace"))
    return 200 <= status < 300, output_line(line_id, custom_id, status=status, request_id=request_id, body=body)
