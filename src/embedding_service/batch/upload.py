"""A multipart upload (`file` and `purpose`), streamed straight into the data folder's tmp/.

Not Starlette's form parser: it spools files to the system temp folder, which in a locked-down container is a
tmpfs (memory). Here the file part goes to `data_dir/tmp/` as it arrives, bounded in bytes; other fields are
small (64 KiB each, 8 at most); the body is cut off at the limit whether or not it declared a length.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import BinaryIO

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from ..errors import ErrorKind, ServiceError

__all__ = ["Form", "read_form"]

_MAX_FIELD_BYTES = 64 * 1024
_MAX_FIELDS = 8


def _bad(message: str, param: str | None = None) -> ServiceError:
    return ServiceError(ErrorKind.INVALID_REQUEST, message, param=param)


@dataclass
class Form:
    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None  # set when the `file` part came
    file_bytes: int = 0


class _Parts:
    """python-multipart's callbacks: fields into memory, the `file` part into `out`."""

    def __init__(self, out: BinaryIO, max_file_bytes: int) -> None:
        self.out, self.max_file_bytes = out, max_file_bytes
        self.form = Form()
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._name = ""
        self._is_file = False
        self._value = bytearray()

    def callbacks(self) -> dict[str, object]:
        return {"on_part_begin": self.begin, "on_header_field": self.header_field,
                "on_header_value": self.header_value, "on_header_end": self.header_end,
                "on_part_data": self.data, "on_part_end": self.end}

    def begin(self) -> None:
        self._name, self._is_file = "", False
        self._value.clear()

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def header_end(self) -> None:
        if bytes(self._header_name).lower() == b"content-disposition":
            _, options = parse_options_header(bytes(self._header_value))
            self._name = options.get(b"name", b"").decode("utf-8", "replace")
            if b"filename" in options:
                if self._name != "file" or self.form.filename is not None:
                    raise _bad("send one file, in the multipart field 'file'", "file")
                self._is_file = True
                self.form.filename = options[b"filename"].decode("utf-8", "replace")[:255] or "upload.jsonl"
        self._header_name.clear()
        self._header_value.clear()

    def data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            self.form.file_bytes += end - start
            if self.form.file_bytes > self.max_file_bytes:
                raise ServiceError(ErrorKind.PAYLOAD_TOO_LARGE, f"the file is over {self.max_file_bytes} bytes, "
                                   "the most this server stores", param="file", code="file_too_large")
            self.out.write(data[start:end])
        else:
            self._value += data[start:end]
            if len(self._value) > _MAX_FIELD_BYTES:
                raise _bad(f"the form field '{self._name[:50]}' is over {_MAX_FIELD_BYTES} bytes")

    def end(self) -> None:
        if not self._is_file:
            if len(self.form.fields) >= _MAX_FIELDS:
                raise _bad(f"the form has more than {_MAX_FIELDS} fields")
            self.form.fields[self._name] = self._value.decode("utf-8", "replace")


async def read_form(content_type: str, body: AsyncIterator[bytes], out: BinaryIO, *, max_file_bytes: int,
                    max_body_bytes: int) -> Form:
    """Parse a multipart body, writing its `file` part to `out`. ServiceError (4xx) for anything wrong."""
    media, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if media != b"multipart/form-data" or not boundary:
        raise ServiceError(ErrorKind.UNSUPPORTED_MEDIA_TYPE, "send multipart/form-data with the fields 'file' and "
                           "'purpose' (curl: -F purpose=batch -F file=@requests.jsonl)", code="unsupported_media_type")
    parts = _Parts(out, max_file_bytes)
    parser = MultipartParser(boundary, parts.callbacks())  # type: ignore[arg-type]
    received = 0
    try:
        async for chunk in body:
            received += len(chunk)
            if received > max_body_bytes:
                raise ServiceError(ErrorKind.PAYLOAD_TOO_LARGE, f"the upload is over {max_body_bytes} bytes",
                                   code="file_too_large")
            parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        raise _bad(f"malformed multipart form: {exc}") from None
    return parts.form
