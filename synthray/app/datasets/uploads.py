"""Receiving an upload: a multipart body with text fields and one ``file`` (a zip, or a
single DICOM/PNG/JPEG file).

The body is counted while it streams and cut off past the configured limit; parts are
spooled to disk by the multipart parser, then moved into a private folder under the
work directory (``<folder>/data``). Client file names are never used on disk or in
messages. Text fields are validated before any file is unpacked.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.types import Message

from synthray.app.datasets.unpack import extract_zip, remove_tree
from synthray.app.deps import off_loop
from synthray.app.errors import Invalid, PayloadTooLarge
from synthray.config import Settings

M = TypeVar("M", bound=BaseModel)
R = TypeVar("R")
FIELD_BYTES = 65536  # a text field (the JSON spec), as the OpenAPI document says
RATIO_FLOOR_BYTES = 64 * 1024**2
SINGLE_SUFFIXES = {
    ".dcm": ".dcm",
    ".dicom": ".dcm",
    ".png": ".png",
    ".jpg": ".jpg",
    ".jpeg": ".jpg",
}


def json_field(name: str, model: type[M]) -> Callable[[dict[str, str]], M]:
    """A field parser: the form field ``name`` holds ``model`` as JSON."""

    def parse(fields: dict[str, str]) -> M:
        raw = fields.get(name)
        if raw is None:
            raise Invalid(f"the form needs a '{name}' field (JSON)", field=name)
        try:
            return model.model_validate_json(raw)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or name
            raise Invalid(f"{name}.{where}: {err['msg']}", field=f"{name}.{where}") from exc

    return parse


async def receive(
    request: Request, settings: Settings, parse: Callable[[dict[str, str]], M]
) -> tuple[Path, M]:
    """Stream the upload to a private folder; returns (folder, parsed fields)."""
    limit = settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the upload is larger than {limit} bytes")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise Invalid("send multipart/form-data with a 'file' part", field="body")
    seen = 0

    async def counting_receive() -> Message:
        nonlocal seen
        message = await request.receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise PayloadTooLarge(f"the upload is larger than {limit} bytes")
        return message

    form = await Request(request.scope, counting_receive).form(
        max_files=1, max_fields=8, max_part_size=FIELD_BYTES
    )
    try:
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        upload = form.get("file")
        parsed = parse(fields)
        if not isinstance(upload, UploadFile):
            raise Invalid("the form needs a 'file' part", field="file")
        folder = settings.work_dir / "uploads" / uuid.uuid4().hex
        data = folder / "data"
        data.mkdir(parents=True)
        try:
            # Copying and unpacking take seconds to minutes: off the event loop, so that
            # every other request (the probes included) is served meanwhile.
            await run_in_threadpool(_store, upload, folder, data, settings)
        except BaseException:
            remove_tree(folder)
            raise
        return folder, parsed
    finally:
        await form.close()


def _store(upload: UploadFile, folder: Path, data: Path, settings: Settings) -> None:
    head = upload.file.read(4)
    upload.file.seek(0)
    suffix = Path(upload.filename or "").suffix.lower()
    if head == b"PK\x03\x04" or suffix == ".zip":
        archive = folder / ".upload.zip"
        with archive.open("wb") as out:
            shutil.copyfileobj(upload.file, out, 1 << 20)
        # A zip bomb stops at a multiple of its own size, not at the absolute limit.
        ratio_cap = max(archive.stat().st_size * settings.max_zip_ratio, RATIO_FLOOR_BYTES)
        try:
            n = extract_zip(
                archive,
                data,
                max_entries=settings.max_zip_entries,
                max_total_bytes=min(settings.max_unpacked_bytes, ratio_cap),
            )
        finally:
            archive.unlink(missing_ok=True)
        if n == 0:
            raise Invalid("the zip holds no file", field="file")
    else:
        with (data / f"upload-1{SINGLE_SUFFIXES.get(suffix, '')}").open("wb") as out:
            shutil.copyfileobj(upload.file, out, 1 << 20)


async def accept(
    request: Request,
    session: Session,
    settings: Settings,
    parse: Callable[[dict[str, str]], M],
    queue: Callable[[Path, M], R],
) -> R:
    """Receive an upload and hand it to ``queue(folder, fields)`` (run in a thread, on the
    request's session, through ``deps.off_loop``). The transaction the key check opened is
    ended first: SQLite holds its write lock from BEGIN, and an upload can take minutes. If
    queueing fails, the uploaded files are removed."""
    await off_loop(session, session.commit)  # and its turn to write (deps._write_gate)
    folder, parsed = await receive(request, settings, parse)
    try:
        return await off_loop(session, queue, folder, parsed)
    except BaseException:
        remove_tree(folder)
        raise
