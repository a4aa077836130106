"""Exports: the only way synthetic images leave SynthRay.

The gate is enforced here, for every role: an export can be requested only for a
batch whose memorization check passed, and the bundle is built only from images whose
bytes still hash to the checked value, leaving out every flagged image. Downloads are
allowed only to the partner the export is addressed to (and admins), only after a
reviewer approved it, and every attempt, refused or not, is audited.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
from sqlalchemy.orm import Session

from synthray.app.audit import service as audit
from synthray.app.auth import service as keys
from synthray.app.auth.schemas import Principal, Role
from synthray.app.batches import service as batches
from synthray.app.batches.schemas import BatchState
from synthray.app.batches.tables import SyntheticBatch
from synthray.app.datasets import service as datasets
from synthray.app.db import utcnow
from synthray.app.errors import Conflict, Forbidden, Invalid, NotFound, Unauthorized
from synthray.app.evaluations import service as evaluations
from synthray.app.exports import bundle, privacy, repository
from synthray.app.exports.schemas import ExportAccepted, ExportCreate, ExportRead, ExportState
from synthray.app.exports.tables import Export
from synthray.app.jobs import service as jobs
from synthray.app.jobs.context import JobContext, JobFailed
from synthray.app.jobs.schemas import JobKind
from synthray.app.registry import service as registry
from synthray.app.registry.summary import audit_verdict
from synthray.app.storage import BlobCorrupt, BlobNotFound, BlobStore
from synthray.config import Settings


def gate(batch: SyntheticBatch) -> None:
    """Refuse anything but a checked, passed, unchanged batch."""
    if batch.state != BatchState.passed:
        reason = {
            BatchState.generating: "is still being generated",
            BatchState.unchecked: "has not been checked for memorization",
            BatchState.checking: "is being checked for memorization",
            BatchState.failed: "failed the memorization check",
        }.get(batch.state, f"is {batch.state}")
        raise Conflict(f"batch {batch.id} {reason}; it cannot be exported")
    if not batch.images_blob or batch.checked_sha256 != batch.images_blob:
        raise Conflict(f"batch {batch.id} changed after its check; it cannot be exported")


def audit_gate(metrics: dict[str, Any]) -> None:
    """Where the site requires it: refuse a generator version whose membership-inference
    audit is missing or missed its goals."""
    result = metrics.get("privacy_audit")
    if not result:
        raise Conflict(
            "the generator version has no membership-inference audit, and this site "
            "requires a passed one before export"
        )
    if not result.get("passed"):
        why = result.get("skipped") or (
            f"worst AUROC {result.get('worst_auroc')}, TPR at 1% FPR "
            f"{result.get('worst_tpr_at_1pct_fpr')}; goals {result.get('goal')}; "
            f"{audit_verdict(result)}"
        )
        raise Conflict(
            f"the generator version failed its membership-inference audit ({why}); this "
            "site requires a passed one before export"
        )


def request_export(
    session: Session, settings: Settings, req: ExportCreate, who: Principal
) -> ExportAccepted:
    batch = batches.get(session, req.batch_id)
    gate(batch)
    if settings.export_requires_passed_audit:
        audit_gate(registry.get_version_by_id(session, batch.model_version_id).metrics)
    if not keys.active_partner_exists(session, req.partner):
        raise Invalid("no active partner key has this name", field="partner")
    export = repository.add(
        session, Export(batch_id=batch.id, partner=req.partner, requested_by=who.key_id)
    )
    job = jobs.create(session, settings, JobKind.export, {"export_id": export.id}, who.key_id)
    export.build_job_id = job.id
    audit.record(
        session,
        who,
        "request_export",
        "export",
        export.id,
        "ok",
        {"batch_id": batch.id, "partner": req.partner},
    )
    session.flush()
    return ExportAccepted(export_id=export.id, job_id=job.id)


def build(ctx: JobContext) -> dict[str, object]:
    """The export job: re-check the gate, then write the bundle from unflagged images."""
    export_id = int(ctx.params["export_id"])
    with ctx.session() as session:
        export = repository.get(session, export_id)
        if export is None:
            raise JobFailed(f"export {export_id} not found")
        if export.state != ExportState.building:
            return {"export_id": export_id, "state": export.state}
        batch = batches.get(session, export.batch_id)
        gate(batch)
        assert batch.images_blob is not None
        report = batches.report(session, ctx.blobs, batch.id)
        keep = ~np.array([img["flagged"] for img in report["images"]], dtype=bool)
        mv = registry.get_version_by_id(session, batch.model_version_id)
        if ctx.settings.export_requires_passed_audit:
            try:
                audit_gate(mv.metrics)
            except Conflict as exc:
                raise JobFailed(str(exc)) from exc
        images_blob = batch.images_blob
        classes = list(mv.classes)
        # How the batch's images were chosen from those drawn (oversample, per class).
        selection: dict[str, Any] = dict(batch.selection or {})
        provenance = {
            "export_id": export_id,
            "partner": export.partner,
            "batch_id": batch.id,
            "batch_images_sha256": images_blob,
            "model": mv.registered_model.name,
            "model_version": mv.version,
            "model_sha256": mv.blob_sha256,
            "architecture": mv.architecture,
            "dataset_version_sha256": datasets.content_sha256(session, mv.dataset_version_id),
            "selection": selection,
        }
        utility = _utility(session, ctx.blobs, mv.id)
        dv = datasets.ready_version(session, mv.dataset_version_id)
        dataset = {
            "holdout_fraction": dv.holdout_fraction,
            "split_seed": dv.split_seed,
            "counts": dv.counts,
            "provenance": dv.provenance,
        }
        audit_result = mv.metrics.get("privacy_audit")
    try:
        arrays = ctx.blobs.get_arrays(images_blob)
    except (BlobCorrupt, BlobNotFound) as exc:
        raise JobFailed(f"batch images fail their integrity check: {exc}") from exc
    images, labels = arrays["images"], arrays["labels"]
    if len(images) != len(keep):
        raise JobFailed("the batch and its report disagree on the number of images")
    ctx.progress(0, int(keep.sum()), "writing the bundle")
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=ctx.work_dir, prefix="bundle-", suffix=".zip")
    os.close(fd)
    try:
        manifest = bundle.write_bundle(
            Path(tmp),
            images=images,
            labels=labels,
            keep=keep,
            classes=classes,
            report=report,
            provenance=provenance,
            privacy_card=privacy.scorecard(
                dataset=dataset,
                report=report,
                audit=audit_result,
                exported=int(keep.sum()),
                removed=int((~keep).sum()),
                selection=selection,
            ),
            utility=utility,
            uid_root=ctx.settings.dicom_uid_root,
        )
        sha, size = ctx.blobs.put_file(Path(tmp))
    finally:
        Path(tmp).unlink(missing_ok=True)
    with ctx.session() as session:
        export = repository.get(session, export_id)
        assert export is not None
        export.bundle_sha256 = sha
        export.size_bytes = size
        export.image_count = int(keep.sum())
        export.state = ExportState.awaiting_approval
    ctx.progress(int(keep.sum()), int(keep.sum()), "bundle ready for review")
    return {
        "export_id": export_id,
        "bundle_sha256": sha,
        "size_bytes": size,
        "images": int(keep.sum()),
        "per_class": manifest["exported_per_class"],
    }


def build_ended(session: Session, export_id: int, state: str) -> None:
    """An export still building takes the end state of its failed or cancelled build job."""
    e = repository.get(session, export_id)
    if e is not None and e.state == ExportState.building:
        e.state = ExportState(state)
        session.flush()


def get(session: Session, export_id: int, who: Principal) -> Export:
    e = repository.get(session, export_id)
    # A partner cannot tell another partner's export, or one not yet approved, from a
    # missing one.
    if e is None or (
        who.role == Role.partner and (e.partner != who.name or e.state != ExportState.approved)
    ):
        raise NotFound(f"export {export_id} not found")
    return e


def read(e: Export, who: Principal) -> ExportRead:
    """The export as ``who`` may see it: a partner never sees who requested or reviewed it."""
    out = ExportRead.model_validate(e)
    if who.role == Role.partner:
        out.requested_by, out.reviews = None, []
    return out


def list_exports(session: Session, who: Principal, limit: int = 100) -> list[ExportRead]:
    """Staff see every export; a partner only its own approved ones."""
    if who.role == Role.partner:
        rows = repository.list_for(session, who.name, limit, state=ExportState.approved)
    else:
        rows = repository.list_for(session, None, limit)
    return [read(e, who) for e in rows]


def _reviewable(session: Session, export_id: int, who: Principal, verb: str) -> Export:
    """The export, locked until the transaction ends (so two reviews are counted in
    turn), if it awaits a decision and ``who`` has not given one yet."""
    e = repository.get_for_update(session, export_id)
    if e is None:
        raise NotFound(f"export {export_id} not found")
    if e.state != ExportState.awaiting_approval:
        raise Conflict(f"export {export_id} is {e.state}; only a built bundle can be {verb}")
    if any(r.reviewer_key_id == who.key_id for r in repository.reviews(session, e.id)):
        raise Conflict(f"this key has already reviewed export {export_id}")
    return e


def approve(
    session: Session, settings: Settings, export_id: int, who: Principal, comment: str = ""
) -> Export:
    """Count one approval; the export is approved when ``export_approvals`` distinct keys,
    none of them the requester's, have approved it."""
    e = _reviewable(session, export_id, who, "approved")
    if e.requested_by is not None and e.requested_by == who.key_id:
        reason = "two-person rule: the requester may not approve"
        audit.record_refusal(session, who, "approve_export", "export", e.id, reason)
        raise Forbidden(
            "the key that requested this export cannot approve it: a second person must"
        )
    batch = batches.get(session, e.batch_id)
    gate(batch)
    repository.add_review(session, e.id, who.key_id, who.name, "approve", comment)
    approvals = sum(r.decision == "approve" for r in repository.reviews(session, e.id))
    required = settings.export_approvals
    done = approvals >= required
    if done:
        e.state = ExportState.approved
        e.approved_by = who.key_id
        e.approved_at = utcnow()
    audit.record(
        session,
        who,
        "approve_export",
        "export",
        e.id,
        "ok",
        {"approvals": approvals, "required": required, "approved": done, "comment": comment},
    )
    session.flush()
    session.refresh(e)
    return e


def reject(session: Session, export_id: int, who: Principal, comment: str) -> Export:
    """End the export: it can no longer be approved or downloaded."""
    e = _reviewable(session, export_id, who, "rejected")
    repository.add_review(session, e.id, who.key_id, who.name, "reject", comment)
    e.state = ExportState.rejected
    audit.record(session, who, "reject_export", "export", e.id, "ok", {"comment": comment})
    session.flush()
    session.refresh(e)
    return e


def refuse_unauthenticated(
    session: Session, export_id: str, error: Unauthorized | Forbidden
) -> NoReturn:
    """Audit a download attempt without a valid key (no actor), then raise its 401."""
    audit.record_refusal(
        session,
        None,
        "download_export",
        "export",
        "".join(c for c in export_id[:64] if c.isprintable()),
        "no valid API key",
    )
    raise error


def range_start(header: str | None) -> int:
    """Where a ``Range: bytes=N-...`` request starts (0 without one, or when it is not a
    single plain range: the response then starts at 0 too, or is refused by Starlette)."""
    if not header or not header.startswith("bytes=") or "," in header:
        return 0
    first = header[6:].split("-", 1)[0].strip()
    return int(first) if first.isdigit() and len(first) < 19 else 0


RESUME_WINDOW = timedelta(hours=24)
MAX_RESUMES = 50


def _over_limit(past: list[tuple[datetime, int]], start: int, most: int) -> str | None:
    """Why this request would break a limit of ``most`` downloads, or None. A request from
    the first byte is a new download; one that starts later resumes the last download, at
    most MAX_RESUMES times and within RESUME_WINDOW of it, so that partial requests cannot
    stand in for downloads without bound."""
    fresh = [at for at, first in past if first == 0]
    if start == 0:
        if len(fresh) >= most:
            return f"it may be downloaded {most} time(s) and all are used"
        return None
    if not fresh or utcnow() - fresh[-1] > RESUME_WINDOW:
        return "no download to resume in the last 24 hours; download it from the start"
    resumes = sum(1 for at, first in past if first > 0 and at >= fresh[-1])
    if resumes >= MAX_RESUMES:
        return f"the last download was resumed {MAX_RESUMES} times; download it from the start"
    return None


def open_download(
    session: Session,
    settings: Settings,
    blobs: BlobStore,
    export_id: int,
    who: Principal,
    start: int = 0,
) -> tuple[Path, Export]:
    """Check every rule for a download; a refusal is audited and committed at once.

    The addressed partner's grant may expire (``export_download_days`` after approval) and
    may be limited to ``export_max_downloads`` downloads; a request that resumes a
    download part-way (``start`` > 0) is not a new download. Admins are not limited."""

    def refuse(exc: Exception, reason: str) -> Exception:
        audit.record_refusal(session, who, "download_export", "export", export_id, reason)
        return exc

    e = repository.get(session, export_id)
    if e is None:
        raise refuse(NotFound(f"export {export_id} not found"), "not found")
    if who.role == Role.partner and e.partner != who.name:
        raise refuse(NotFound(f"export {export_id} not found"), "addressed to another partner")
    if who.role not in (Role.partner, Role.admin):
        raise refuse(Forbidden("only the addressed partner or an admin can download"), "role")
    if e.state != ExportState.approved or e.bundle_sha256 is None:
        raise refuse(Conflict(f"export {export_id} is {e.state}, not approved"), "not approved")
    if who.role == Role.partner:
        days = settings.export_download_days
        if days > 0 and e.approved_at is not None:
            ends = e.approved_at + timedelta(days=days)
            if utcnow() > ends:
                message = f"the download grant of export {export_id} ended on {ends:%Y-%m-%d}"
                raise refuse(Forbidden(message), "grant expired")
        most = settings.export_max_downloads
        if most > 0:
            why = _over_limit(audit.download_starts(session, e.id, e.partner), start, most)
            if why is not None:
                raise refuse(Forbidden(f"export {export_id}: {why}"), "download limit reached")
    try:
        path = blobs.open_verified(e.bundle_sha256)
    except (BlobCorrupt, BlobNotFound) as exc:
        raise refuse(Conflict("the bundle failed its integrity check"), "integrity") from exc
    audit.record(
        session,
        who,
        "download_export",
        "export",
        e.id,
        "ok",
        {"bundle_sha256": e.bundle_sha256, "size_bytes": e.size_bytes, "range_start": start},
    )
    return path, e


@dataclass(frozen=True)
class BundleTexts:
    """What a partner reads about a bundle before downloading it."""

    readme: str
    privacy: str
    manifest: dict[str, Any]  # without its per-file list
    files: int


def bundle_texts(blobs: BlobStore, e: Export) -> BundleTexts:
    """The README, the privacy scorecard and the manifest of a built bundle, for the
    partner's page. Only those three members are read (zipfile checks each one's CRC-32)
    and the file's size is compared with the recorded one; the whole bundle's sha256 is
    checked by every download (:func:`open_download`), not by every view of the page, which
    would hash hundreds of megabytes each time."""
    if e.bundle_sha256 is None:
        raise Conflict(f"export {e.id} has no bundle yet")
    path = blobs.path(e.bundle_sha256)
    damaged = Conflict("the bundle failed its integrity check")
    try:
        if e.size_bytes is not None and path.stat().st_size != e.size_bytes:
            raise damaged
        with zipfile.ZipFile(path) as zf:
            readme = zf.read("README.txt").decode()
            privacy = zf.read("PRIVACY.md").decode() if "PRIVACY.md" in zf.namelist() else ""
            manifest = json.loads(zf.read("manifest.json"))
    except (OSError, EOFError, zlib.error, zipfile.BadZipFile, KeyError, ValueError) as exc:
        # A damaged deflate stream raises zlib.error, a damaged stored member BadZipFile.
        raise damaged from exc
    files = manifest.pop("files", [])
    return BundleTexts(readme, privacy, manifest, len(files))


def _utility(session: Session, blobs: BlobStore, model_version_id: int) -> bundle.Utility | None:
    """The generator version's latest finished utility evaluation, for the bundle."""
    e = evaluations.latest_done(session, model_version_id)
    if e is None:
        return None
    return bundle.Utility(
        evaluation_id=e.id,
        result=json.loads(evaluations.artefact(session, blobs, e.id, "result")),
        csv=evaluations.artefact(session, blobs, e.id, "csv"),
        chart_png=evaluations.artefact(session, blobs, e.id, "chart"),
    )
