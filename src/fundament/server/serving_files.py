"""The Files API: multipart uploads streamed straight into the FileStore, listing, content, delete.

The upload is parsed as it arrives (python-multipart's streaming parser), so the file's bytes go
to their temporary file in $FUNDAMENT_HOME/files and nowhere else; a body cut off part-way aborts it.
"""

from __future__ import annotations

import asyncio
import re
from typing import TYPE_CHECKING
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import FileResponse
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from ..errors import InvalidRequestError, NotFoundError
from ..jobs.files import FileStore, Upload
from .protocol_fine_tuning import UPLOAD_PURPOSES, FileDeleted, FileList, FileObject

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks  # a TypedDict defined for type checkers only

MAX_FIELD_BYTES = 4096  # form fields besides the file (purpose, expires_after[...]) are short


# RFC 5987 attr-chars: what filename*= may carry unencoded (no slash, backslash, '%', quote or control)
_ATTR_CHARS = "!#$&+-.^_`|~"


def content_disposition(filename: str) -> str:
    """`attachment` with the stored name made safe, as RFC 6266 says: `filename="..."` is a plain
    ASCII fallback (the last path component; all but letters, digits and ` ._()-` replaced by `_`;
    no leading or trailing dots), and `filename*=UTF-8''...` the real name, percent-encoded
    (its slashes too). The name is the uploader's: echoed raw it could carry a path or a quote."""
    base = re.split(r"[/\\]", filename)[-1]
    fallback = re.sub(r"[^A-Za-z0-9 ._()-]", "_", base).strip(" .") or "file"
    encoded = quote(filename, safe=_ATTR_CHARS, errors="replace")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{encoded}"


def file_object(row: dict) -> FileObject:
    return FileObject(
        id=row["id"],
        bytes=row["bytes"],
        created_at=row["created_at"],
        filename=row["filename"],
        purpose=row["purpose"],
        status=row["status"],
    )


class _Form:
    """Callbacks for MultipartParser: the part named `file` goes to an Upload, others to small buffers."""

    def __init__(self, files: FileStore):
        self.files = files
        self.upload: Upload | None = None
        self.filename: str | None = None
        self.fields: dict[str, str] = {}
        self._headers: dict[bytes, bytes] = {}
        self._field, self._value = b"", b""
        self._name = ""  # the current part's name
        self._buf: bytearray | None = None
        self.ended = False  # the closing boundary was seen: nothing was cut off

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _end(self) -> None:
        self.ended = True

    def _part_begin(self) -> None:
        self._headers, self._field, self._value = {}, b"", b""

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._field.lower()] = self._value
        self._field, self._value = b"", b""

    def _headers_finished(self) -> None:
        _, opts = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = opts.get(b"name", b"").decode("utf-8", "replace")
        if self._name == "file":
            if self.upload is not None:
                raise InvalidRequestError("Send exactly one 'file' part.", "file")
            self.filename = opts.get(b"filename", b"upload").decode("utf-8", "replace") or "upload"
            self.upload = self.files.begin()
            self._buf = None
        else:
            self._buf = bytearray()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._buf is None:
            assert self.upload is not None  # begun by _headers_finished of this 'file' part
            self.upload.write(data[start:end])
        else:
            self._buf += data[start:end]
            if len(self._buf) > MAX_FIELD_BYTES:
                raise InvalidRequestError(
                    f"The form field '{self._name}' is longer than {MAX_FIELD_BYTES} bytes.", self._name
                )

    def _part_end(self) -> None:
        if self._buf is not None:
            self.fields[self._name] = self._buf.decode("utf-8", "replace")
            self._buf = None


class FilesHandler:
    def __init__(self, files: FileStore):
        self.files = files
        self.store = files.store

    async def create(self, request: Request) -> FileObject:
        ctype, opts = parse_options_header(request.headers.get("content-type", ""))
        if ctype != b"multipart/form-data" or b"boundary" not in opts:
            raise InvalidRequestError(
                "Upload files as multipart/form-data with the fields 'file' and 'purpose'.", "file"
            )
        form = _Form(self.files)
        parser = MultipartParser(opts[b"boundary"], form.callbacks())
        try:
            async for chunk in request.stream():
                parser.write(chunk)
            parser.finalize()
            if not form.ended:
                raise InvalidRequestError(
                    "The multipart body ended before its closing boundary; nothing was stored.", "file"
                )
            purpose = form.fields.get("purpose")
            if form.upload is None:
                raise InvalidRequestError("Missing required parameter: 'file'.", "file")
            if purpose is None:
                raise InvalidRequestError("Missing required parameter: 'purpose'.", "purpose")
            if purpose not in UPLOAD_PURPOSES:
                raise InvalidRequestError(
                    f"Invalid purpose {purpose!r}: use one of {', '.join(UPLOAD_PURPOSES)}.", "purpose"
                )
            if form.upload.bytes == 0:
                raise InvalidRequestError("The file is empty.", "file")
            assert form.filename is not None  # set with form.upload
            row = await asyncio.to_thread(form.upload.commit, form.filename, purpose)
        except (ClientDisconnect, FormParserError) as e:
            if form.upload is not None:
                form.upload.abort()
            why = (
                "was cut off before its end"
                if isinstance(e, ClientDisconnect)
                else f"is not valid multipart/form-data ({e})"
            )
            raise InvalidRequestError(f"The upload {why}; nothing was stored.", "file") from None
        except BaseException:
            if form.upload is not None:
                form.upload.abort()
            raise
        return file_object(row)

    def list(self, after: str | None, limit: int, order: str, purpose: str | None) -> FileList:
        if not 1 <= limit <= 10000:
            raise InvalidRequestError(f"limit must be between 1 and 10000, got {limit}.", "limit")
        if order not in ("asc", "desc"):
            raise InvalidRequestError(f"order must be 'asc' or 'desc', got {order!r}.", "order")
        rows, more = self.store.list_files(after, limit, order, purpose)
        data = [file_object(r) for r in rows]
        return FileList(
            data=data, has_more=more, first_id=data[0].id if data else None, last_id=data[-1].id if data else None
        )

    def get_row(self, file_id: str) -> dict:
        row = self.store.get_file(file_id)
        if row is None:
            raise NotFoundError(f"No such File object: {file_id}", "file_id")
        return row

    def retrieve(self, file_id: str) -> FileObject:
        return file_object(self.get_row(file_id))

    def content(self, file_id: str) -> FileResponse:
        row = self.get_row(file_id)
        return FileResponse(
            self.files.path(file_id),
            media_type="application/octet-stream",
            headers={"content-disposition": content_disposition(row["filename"])},
        )

    def delete(self, file_id: str) -> FileDeleted:
        if not self.files.delete(file_id):
            raise NotFoundError(f"No such File object: {file_id}", "file_id")
        return FileDeleted(id=file_id, deleted=True)
