"""Imports every table so that Alembic and tests see the whole schema."""

from synthray.app.audit.forward import AuditForward
from synthray.app.audit.tables import AuditEvent, AuditHead
from synthray.app.auth.tables import ApiKey
from synthray.app.batches.tables import SyntheticBatch
from synthray.app.datasets.tables import Dataset, DatasetImage, DatasetVersion
from synthray.app.db import Base
from synthray.app.evaluations.tables import Evaluation
from synthray.app.exports.tables import Export, ExportReview
from synthray.app.imagechecks.tables import ImageCheck
from synthray.app.jobs.tables import Job
from synthray.app.registry.tables import ModelVersion, RegisteredModel
from synthray.app.storecheck import StoreIdentity
from synthray.app.web.tables import WebSession

__all__ = [
    "ApiKey",
    "AuditEvent",
    "AuditForward",
    "AuditHead",
    "Base",
    "Dataset",
    "DatasetImage",
    "DatasetVersion",
    "Evaluation",
    "Export",
    "ExportReview",
    "ImageCheck",
    "Job",
    "ModelVersion",
    "RegisteredModel",
    "StoreIdentity",
    "SyntheticBatch",
    "WebSession",
]
