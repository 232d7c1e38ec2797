"""Files: multipart upload (streamed to disk, size-limited, stored atomically), list, retrieve, delete,
content. A file lives at DATA_DIR/files/<file id>; the uploaded name is kept only as a label."""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path
from typing import Any

from anyio import to_thread
from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse
from python_multipart.multipart import MultipartParser, parse_options_header
from sqlalchemy import and_, delete, func, or_, select

from tunery.data.formats import converted_name, sniff_format
from tunery.errors import TuneryError
from tunery.server.deps import Auth, State
from tunery.server.errors import APIError, bad_request, not_found
from tunery.server.middleware import file_too_large
from tunery.server.schemas import cursor_page, file_object
from tunery.server.store import File, new_id, now

router = APIRouter()

PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
PARTIAL = ".tmp-"  # an upload being written: DATA_DIR/files/.tmp-<file id>, renamed when complete


def clean_filename(raw: str) -> str:
    """A label for the listing: the last path component, printable characters only, at most 255."""
    name = raw.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if unicodedata.category(c)[0] != "C").strip()
    return name[:255] or "upload"


# an upload's form fields besides the file (purpose, expires_after[...]): their bytes together, their number
FIELD_BYTES = 64 * 1024
MAX_FIELDS = 16


class _Upload:
    """Streaming multipart parser: form fields into memory (small), the file part straight to disk."""

    def __init__(self, tmp_path: Path, limit: int) -> None:
        self.tmp_path, self.limit = tmp_path, limit
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.size = 0
        self.field_bytes = 0  # of every form field together
        self.too_large = False
        self._fh: Any = None
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._name = ""
        self._value = bytearray()
        self._is_file = False
        self.complete = False  # the body's closing boundary was read

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._begin,
            "on_header_field": lambda d, s, e: setattr(self, "_header_field", self._header_field + d[s:e]),
            "on_header_value": lambda d, s, e: setattr(self, "_header_value", self._header_value + d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._data,
            "on_part_end": self._end,
            "on_end": lambda: setattr(self, "complete", True),
        }

    def close(self) -> None:
        """The file part's handle, when the body ended inside it (cut short, or refused)."""
        if self._fh is not None and not self._fh.closed:
            self._fh.close()

    def _begin(self) -> None:
        self._headers, self._value, self._is_file = {}, bytearray(), False

    def _header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field, self._header_value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" in options and self._name == "file":
            if self._fh is not None:
                raise APIError(400, "Send one file per upload.", "file")
            self._is_file = True
            self.filename = clean_filename(options[b"filename"].decode("utf-8", "replace"))
            # the owner's alone (0600), whatever the umask: uploads are people's training data
            fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            self._fh = os.fdopen(fd, "wb")

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            self.size += end - start
            if self.size > self.limit:
                self.too_large = True
                return
            self._fh.write(data[start:end])
            return
        # the form fields together, not each: 3,000 fields of 64 KB had held 1.2 GB of the API process
        self.field_bytes += end - start
        if self.field_bytes > FIELD_BYTES:
            raise APIError(400, f"An upload's form fields come to more than {FIELD_BYTES:,} bytes.", None)
        self._value += data[start:end]

    def _end(self) -> None:
        if self._is_file:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
        elif self._name:
            self.fields[self._name] = self._value.decode("utf-8", "replace")
            if len(self.fields) > MAX_FIELDS:
                raise APIError(400, f"An upload has at most {MAX_FIELDS} form fields besides the file.", None)


def remove_partial_uploads(files_dir: Path) -> None:
    """Uploads a stopped server left half-written (the route removes its own, but not on a crash or a
    kill). Called at start-up, before any upload can be in progress."""
    if files_dir.is_dir():
        for path in files_dir.glob(PARTIAL + "*"):
            path.unlink(missing_ok=True)


@router.post("/files")
async def create_file(request: Request, state: State, caller: Auth) -> dict[str, Any]:
    limit = state.settings.max_upload_bytes  # a body far past it got its 413 before this (middleware.py)
    content_type, options = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data" or b"boundary" not in options:
        raise bad_request(
            "Upload a file as multipart/form-data with the fields 'file' and 'purpose'.", "file"
        )
    file_id = new_id("file-")
    files_dir = state.settings.files_dir
    files_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = files_dir / f"{PARTIAL}{file_id}"
    upload = _Upload(tmp, limit)
    try:
        parser = MultipartParser(options[b"boundary"], upload.callbacks())  # type: ignore[arg-type]
        async for chunk in request.stream():
            parser.write(chunk)
            if upload.too_large:
                raise file_too_large(limit)
        parser.finalize()
        if not upload.complete:  # the connection ended mid-body: what arrived is not the whole file
            raise bad_request(
                "The upload ended before the multipart body's closing boundary, so the file may be cut "
                "short: send it again.",
                "file",
            )
        purpose = upload.fields.get("purpose")
        if upload.filename is None:
            raise bad_request("Missing required parameter: 'file'.", "file", "missing_required_parameter")
        if not purpose:
            raise bad_request(
                "Missing required parameter: 'purpose'.", "purpose", "missing_required_parameter"
            )
        if purpose not in PURPOSES:
            raise bad_request(
                f"Invalid value for 'purpose': '{purpose}'; use one of {', '.join(PURPOSES)}.",
                "purpose",
                "invalid_value",
            )
        if purpose == "fine-tune" and not upload.filename.lower().endswith(".jsonl"):
            hint = await to_thread.run_sync(_format_hint, tmp, upload.filename, limit)
            raise bad_request(
                "Invalid file format for Fine-Tuning API. Must be .jsonl" + hint,
                "file",
                "invalid_file_format",
            )
        if upload.size == 0:
            raise bad_request("The file is empty.", "file", "empty_file")
        expires_at = _expiry(upload.fields)
        os.replace(tmp, files_dir / file_id)
        row = File(
            id=file_id,
            project_id=caller.project_id,
            filename=upload.filename,
            purpose=purpose,
            bytes=upload.size,
            created_at=now(),
            expires_at=expires_at,
        )
        try:
            with state.store.session() as session:
                row.seq = int(session.scalar(select(func.max(File.seq))) or 0) + 1
                session.add(row)
        except BaseException:
            (files_dir / file_id).unlink(missing_ok=True)
            raise
        if state.audit is not None:
            uploaded = {"file_id": file_id, "filename": row.filename, "purpose": purpose, "bytes": row.bytes}
            await to_thread.run_sync(
                state.audit.append, caller.project_name, "file.uploaded", uploaded, caller.key_id
            )
        return file_object(row)
    except APIError:
        raise
    except Exception as exc:
        if type(exc).__name__.endswith("ParseError"):
            raise bad_request(f"Could not parse the multipart body: {exc}", "file") from None
        raise
    finally:
        upload.close()
        tmp.unlink(missing_ok=True)


def _format_hint(path: Path, filename: str, limit: int) -> str:
    """For a fine-tuning upload that is not .jsonl: what it looks like (a CSV, a JSON array...) and the
    command that converts it (tunery/data/formats.py), or "" when the head does not tell."""
    try:
        found = sniff_format(path, limit, name=filename)
    except TuneryError:  # empty, binary...: OpenAI's message says enough
        return ""
    if found is None:
        return ""
    message = found.message()
    then = f" Then upload {converted_name(filename)}." if found.convertible or found.needs_columns else ""
    return f". {filename}: {message[0].upper()}{message[1:]}.{then}"


def _expiry(fields: dict[str, str]) -> int | None:
    seconds = fields.get("expires_after[seconds]")
    if seconds is None:
        return None
    if fields.get("expires_after[anchor]", "created_at") != "created_at":
        raise bad_request(
            "expires_after[anchor] must be 'created_at'.", "expires_after.anchor", "invalid_value"
        )
    if not (seconds.isascii() and seconds.isdigit()) or not 3600 <= int(seconds) <= 2592000:
        raise bad_request(
            "expires_after[seconds] must be between 3600 and 2592000.",
            "expires_after.seconds",
            "invalid_value",
        )
    return now() + int(seconds)


def get_file(state: State, caller: Auth, file_id: str) -> File:
    with state.store.session() as session:
        row = session.get(File, file_id)
    if row is None or row.project_id != caller.project_id or row.expired:
        raise not_found("file", file_id, "file_id")
    return row


@router.get("/files")
def list_files(
    state: State,
    caller: Auth,
    after: str | None = None,
    limit: int = Query(10000, ge=1, le=10000),
    order: str = Query("desc", pattern="^(asc|desc)$"),
    purpose: str | None = None,
) -> dict[str, Any]:
    with state.store.session() as session:
        query = select(File).where(
            File.project_id == caller.project_id, or_(File.expires_at.is_(None), File.expires_at >= now())
        )
        if purpose:
            query = query.where(File.purpose == purpose)
        if after:
            cursor = session.get(File, after)
            if cursor is None or cursor.project_id != caller.project_id:
                raise not_found("file", after, "after")
            key = (cursor.seq, cursor.id)
            if order == "desc":
                query = query.where(or_(File.seq < key[0], and_(File.seq == key[0], File.id < key[1])))
            else:
                query = query.where(or_(File.seq > key[0], and_(File.seq == key[0], File.id > key[1])))
        if order == "desc":
            query = query.order_by(File.seq.desc(), File.id.desc())
        else:
            query = query.order_by(File.seq, File.id)
        rows = session.scalars(query.limit(limit + 1)).all()
    return cursor_page([file_object(r) for r in rows[:limit]], len(rows) > limit, with_ids=True)


@router.get("/files/{file_id}")
def retrieve_file(state: State, caller: Auth, file_id: str) -> dict[str, Any]:
    return file_object(get_file(state, caller, file_id))


@router.delete("/files/{file_id}")
def delete_file(state: State, caller: Auth, file_id: str) -> dict[str, Any]:
    row = get_file(state, caller, file_id)
    with state.store.session() as session:
        session.execute(delete(File).where(File.id == row.id))
    (state.settings.files_dir / row.id).unlink(missing_ok=True)
    if state.audit is not None:
        deleted = {"file_id": row.id, "filename": row.filename, "purpose": row.purpose, "bytes": row.bytes}
        state.audit.append(caller.project_name, "file.deleted", deleted, caller.key_id)
    return {"id": row.id, "object": "file", "deleted": True}


@router.get("/files/{file_id}/content")
def file_content(state: State, caller: Auth, file_id: str) -> FileResponse:
    row = get_file(state, caller, file_id)
    path = state.settings.files_dir / row.id
    if not path.is_file():
        raise not_found("file", file_id, "file_id")
    if state.audit is not None:  # who read a file's content (training data may be personal data)
        read = {"file_id": row.id, "filename": row.filename, "purpose": row.purpose, "bytes": row.bytes}
        state.audit.append(caller.project_name, "file.content_read", read, caller.key_id)
    return FileResponse(path, media_type="application/octet-stream")
