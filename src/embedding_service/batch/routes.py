"""The Files and Batch API routes (OpenAI's shapes). Every lookup is by (owner, id): another key's file or
batch is answered 404, exactly as one that does not exist, and never listed."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from typing import Any

import orjson
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response, StreamingResponse

from ..api.body import read_json_body
from ..api.embed.protocol import parse_json_body
from ..api.middleware.security import CLIENT_ID_KEY
from ..api.openapi import operation_doc
from ..errors import ErrorKind, ServiceError
from .disk import Disk
from .lines import ENDPOINTS
from .objects import batch_object, file_object, list_object, new_batch_id, new_file_id
from .runner import BatchRunner
from .store import ACTIVE, BatchRow, FileRow, Store
from .upload import Form, read_form

__all__ = ["ENDPOINTS", "build_batch_router"]

MAX_FILES_PER_KEY = 10_000
MAX_ACTIVE_BATCHES_PER_KEY = 100
_WINDOW_S = {"24h": 86_400}
_JSON = "application/json"
_FILE_ERRORS = [ErrorKind.INVALID_REQUEST, ErrorKind.NOT_FOUND]


def _json(content: Any) -> Response:
    return Response(orjson.dumps(content), media_type=_JSON)


def _owner(request: Request) -> str:
    return str(request.scope.get(CLIENT_ID_KEY) or "")


def _bad(message: str, param: str | None = None, code: str | None = None) -> ServiceError:
    return ServiceError(ErrorKind.INVALID_REQUEST, message, param=param, code=code)


def _missing(kind: str, ident: str, param: str | None = None) -> ServiceError:
    return ServiceError(ErrorKind.NOT_FOUND, f"no {kind} with id '{ident[:100]}'", param=param, code="not_found")


def _read_chunks(fd: int, size: int) -> Iterator[bytes]:
    """The first `size` bytes (the file's recorded length: never more than the response promised)."""
    try:
        while size > 0 and (chunk := os.read(fd, min(size, 1 << 20))):
            size -= len(chunk)
            yield chunk
    finally:
        os.close(fd)


def build_batch_router(store: Store, disk: Disk, runner: BatchRunner, *, max_file_bytes: int,
                       max_stored_bytes: int, retention_s: float) -> APIRouter:
    router = APIRouter(tags=["batch"])
    uploads = asyncio.Semaphore(2)  # each upload grows a file in tmp/ until it is whole: bound how many at once

    async def own_file(owner: str, file_id: str) -> FileRow:
        row = await store.call(store.file, owner, file_id)
        if row is None:
            raise _missing("file", file_id)
        return row

    async def own_batch(owner: str, batch_id: str) -> BatchRow:
        row = await store.call(store.batch, owner, batch_id)
        if row is None:
            raise _missing("batch", batch_id)
        return row

    async def upload(request: Request) -> Response:
        owner = _owner(request)
        limit = max_file_bytes + 64 * 1024  # the file plus the form's own bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ServiceError(ErrorKind.PAYLOAD_TOO_LARGE, f"the upload is {declared} bytes; files may be at most "
                               f"{max_file_bytes} bytes", code="file_too_large")
        async with uploads:
            tmp, out = await asyncio.to_thread(disk.temporary)
            try:
                form = await read_form(request.headers.get("content-type", ""), request.stream(), out,
                                       max_file_bytes=max_file_bytes, max_body_bytes=limit)
                row = await _check_upload(owner, form)
                await asyncio.to_thread(disk.adopt, tmp, out, row.id)
            finally:
                out.close()
                tmp.unlink(missing_ok=True)
            await store.call(store.add_file, row)
        return _json(file_object(row))

    async def _check_upload(owner: str, form: Form) -> FileRow:
        if form.fields.get("purpose") != "batch":
            raise _bad("'purpose' must be 'batch' (the only purpose this server stores files for)", "purpose")
        if form.filename is None:
            raise _bad("'file' is missing: send the file as the multipart field 'file'", "file")
        size = form.file_bytes
        if size == 0:
            raise _bad("the file is empty", "file")
        files, _ = await store.call(store.counts, owner)
        if files >= MAX_FILES_PER_KEY:
            raise _bad(f"this key holds {files} files, the most allowed; delete some first", "file",
                       "too_many_files")
        if await store.call(store.stored_bytes) + size > max_stored_bytes:
            raise ServiceError(ErrorKind.PAYLOAD_TOO_LARGE, "the server's storage for files is full; delete files "
                               "you no longer need (DELETE /v1/files/{id})", param="file", code="storage_full")
        now = int(time.time())
        return FileRow(0, new_file_id(), owner, "batch", form.filename, size, now, now + int(retention_s))

    router.add_api_route("/v1/files", upload, methods=["POST"], **operation_doc(
        "Upload a file (multipart: file, purpose=batch)", errors=[ErrorKind.INVALID_REQUEST,
                                                                 ErrorKind.PAYLOAD_TOO_LARGE]))

    @router.get("/v1/files", **operation_doc("List your files, newest first", errors=[ErrorKind.INVALID_REQUEST]))
    async def list_files(request: Request, after: str | None = None, limit: int = Query(10_000, ge=1, le=10_000),
                         purpose: str | None = None) -> Response:
        rows = await store.call(lambda: store.files(_owner(request), after=after, limit=limit + 1, purpose=purpose))
        return _json(list_object([file_object(r) for r in rows[:limit]], len(rows) > limit))

    @router.get("/v1/files/{file_id}", **operation_doc("A file's details", errors=_FILE_ERRORS))
    async def get_file(request: Request, file_id: str) -> Response:
        return _json(file_object(await own_file(_owner(request), file_id)))

    @router.get("/v1/files/{file_id}/content", **operation_doc("A file's content", errors=_FILE_ERRORS,
                                                               media_type="application/octet-stream"))
    async def file_content(request: Request, file_id: str) -> Response:
        row = await own_file(_owner(request), file_id)
        try:  # opened now: a delete while it streams does not cut it short
            fd = await asyncio.to_thread(os.open, disk.path(row.id), os.O_RDONLY)
        except FileNotFoundError:
            raise _missing("file", file_id) from None
        return StreamingResponse(_read_chunks(fd, row.bytes), media_type="application/octet-stream",
                                 headers={"content-length": str(row.bytes)})

    @router.delete("/v1/files/{file_id}", **operation_doc("Delete a file", errors=_FILE_ERRORS))
    async def delete_file(request: Request, file_id: str) -> Response:
        owner = _owner(request)
        await own_file(owner, file_id)
        user = await store.call(store.file_in_use, owner, file_id)
        if user is not None:
            raise _bad(f"the file is the input of batch {user}, which is not finished; cancel it first",
                       code="file_in_use")
        if await store.call(store.delete_file, owner, file_id):
            await asyncio.to_thread(disk.remove, file_id)
        return _json({"id": file_id, "object": "file", "deleted": True})

    async def create_batch(request: Request) -> Response:
        owner = _owner(request)
        data = parse_json_body(await read_json_body(request, 65536))
        if not isinstance(data, dict):
            raise _bad("request body must be a JSON object")
        row = await _new_batch(owner, data)
        await store.call(store.add_batch, row)
        runner.wake()
        return _json(batch_object(row))

    async def _new_batch(owner: str, data: dict[str, Any]) -> BatchRow:
        endpoint, window, file_id = data.get("endpoint"), data.get("completion_window"), data.get("input_file_id")
        if endpoint not in ENDPOINTS:
            raise _bad(f"'endpoint' must be one of {', '.join(ENDPOINTS)}", "endpoint")
        if window not in _WINDOW_S:
            raise _bad("'completion_window' must be '24h'", "completion_window")
        if not isinstance(file_id, str):
            raise _bad("'input_file_id' must be the id of a file uploaded with purpose 'batch'", "input_file_id")
        source = await own_file(owner, file_id)
        if source.purpose != "batch":
            raise _bad("the input file must have purpose 'batch'", "input_file_id")
        metadata = data.get("metadata")
        if metadata is not None and not (
                isinstance(metadata, dict) and len(metadata) <= 16
                and all(isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
                        for k, v in metadata.items())):
            raise _bad("'metadata' holds at most 16 string keys (64 characters) with string values (512)", "metadata")
        extra = sorted(set(data) - {"endpoint", "completion_window", "input_file_id", "metadata"})
        if extra:
            raise _bad(f"unknown field '{extra[0][:50]}'", extra[0][:50])
        _, active = await store.call(store.counts, owner)
        if active >= MAX_ACTIVE_BATCHES_PER_KEY:
            raise ServiceError(ErrorKind.RATE_LIMITED, f"this key has {active} unfinished batches, the most "
                               "allowed; wait for some to finish", code="too_many_batches")
        now = int(time.time())
        return BatchRow(0, new_batch_id(), owner, endpoint, file_id, window, "validating",
                        orjson.dumps(metadata).decode() if metadata else None, None, now, None,
                        now + _WINDOW_S[window], None, None, None, None, None, None, 0, 0, 0, None, None, 0, 0, 0,
                        new_file_id(), new_file_id())

    router.add_api_route("/v1/batches", create_batch, methods=["POST"], **operation_doc(
        "Create a batch from an uploaded file", errors=[*_FILE_ERRORS, ErrorKind.RATE_LIMITED]))

    @router.get("/v1/batches", **operation_doc("List your batches, newest first", errors=[ErrorKind.INVALID_REQUEST]))
    async def list_batches(request: Request, after: str | None = None,
                           limit: int = Query(20, ge=1, le=100)) -> Response:
        rows = await store.call(lambda: store.batches(_owner(request), after=after, limit=limit + 1))
        return _json(list_object([batch_object(r) for r in rows[:limit]], len(rows) > limit))

    @router.get("/v1/batches/{batch_id}", **operation_doc("A batch's status", errors=_FILE_ERRORS))
    async def get_batch(request: Request, batch_id: str) -> Response:
        return _json(batch_object(await own_batch(_owner(request), batch_id)))

    @router.post("/v1/batches/{batch_id}/cancel", **operation_doc("Cancel a batch (what is done is kept)",
                                                                  errors=_FILE_ERRORS))
    async def cancel_batch(request: Request, batch_id: str) -> Response:
        owner = _owner(request)
        row = await own_batch(owner, batch_id)
        if row.status not in ACTIVE and row.status != "cancelled":
            raise _bad(f"the batch is {row.status}; only an unfinished batch can be cancelled", code="batch_finished")
        changed = await store.call(lambda: store.update_batch(
            batch_id, only_if=("validating", "in_progress"), status="cancelling", cancelling_at=int(time.time())))
        if changed:
            runner.cancel(batch_id)
        return _json(batch_object(await own_batch(owner, batch_id)))

    return router
