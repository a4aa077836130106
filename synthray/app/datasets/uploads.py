"""Receiving an upload: a multipart body with a ``spec`` field (DatasetCreate as JSON)
and one ``file`` (a zip, or a single DICOM/PNG/JPEG file).

The body is counted while it streams and cut off past the configured limit; parts are
spooled to disk by the multipart parser, then moved into a private folder under the
work directory. Client file names are never used on disk or in messages.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.types import Message

from synthray.app.datasets import service
from synthray.app.datasets.schemas import DatasetCreate, IngestAccepted
from synthray.app.datasets.unpack import extract_zip, remove_tree
from synthray.app.errors import Invalid, PayloadTooLarge
from synthray.config import Settings

SPEC_FILE = ".spec.json"
SINGLE_SUFFIXES = {
    ".dcm": ".dcm",
    ".dicom": ".dcm",
    ".png": ".png",
    ".jpg": ".jpg",
    ".jpeg": ".jpg",
}


async def receive(request: Request, settings: Settings) -> Path:
    limit = settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the upload is larger than {limit} bytes")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise Invalid("send multipart/form-data with the fields 'spec' and 'file'", field="body")
    seen = 0

    async def counting_receive() -> Message:
        nonlocal seen
        message = await request.receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise PayloadTooLarge(f"the upload is larger than {limit} bytes")
        return message

    counted = Request(request.scope, counting_receive)
    form = await counted.form(max_files=1, max_fields=4)
    try:
        raw_spec = form.get("spec")
        upload = form.get("file")
        if not isinstance(raw_spec, str):
            raise Invalid("the form needs a 'spec' field with the dataset as JSON", field="spec")
        if not isinstance(upload, UploadFile):
            raise Invalid("the form needs a 'file' part", field="file")
        try:
            spec = DatasetCreate.model_validate_json(raw_spec)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "spec"
            raise Invalid(f"spec.{where}: {err['msg']}", field=f"spec.{where}") from exc
        folder = settings.work_dir / "uploads" / uuid.uuid4().hex
        data = folder / "data"
        data.mkdir(parents=True)
        try:
            _store(upload, folder, data, settings)
            (folder / SPEC_FILE).write_text(spec.model_dump_json())
        except BaseException:
            remove_tree(folder)
            raise
        return folder
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
        try:
            n = extract_zip(
                archive,
                data,
                max_entries=settings.max_zip_entries,
                max_total_bytes=settings.max_unpacked_bytes,
            )
        finally:
            archive.unlink(missing_ok=True)
        if n == 0:
            raise Invalid("the zip holds no file", field="file")
    else:
        with (data / f"upload-1{SINGLE_SUFFIXES.get(suffix, '')}").open("wb") as out:
            shutil.copyfileobj(upload.file, out, 1 << 20)


def queue_ingest(session: Session, folder: Path, settings: Settings, key_id: int) -> IngestAccepted:
    spec = DatasetCreate.model_validate_json((folder / SPEC_FILE).read_text())
    (folder / SPEC_FILE).unlink()
    return service.request_ingest(session, settings, spec, key_id, upload_dir=folder)
