"""Utility evaluations: does a generator's output help a downstream classifier?

A request names a registered generator version; the evaluation job reproduces the real
images the generator trained on (its classes, any induced imbalance), draws synthetic
images itself with a recorded seed, keeps only those that pass the memorization gate, and
trains the same classifier on every arm for the same number of steps. Every arm is scored
on the same real test images of patients that neither the generator nor any classifier
saw: the generator's held-out patients, or a second dataset version that shares no
patient with the generator's training split (checked by pseudonymous key).

An evaluation moves queued -> running -> done; its result (JSON, CSV and a chart) is
stored whole or not at all.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy.orm import Session

from synthray import code_version
from synthray.app.audit import service as audit
from synthray.app.auth.schemas import Principal
from synthray.app.datasets import service as datasets
from synthray.app.errors import Invalid, NotFound
from synthray.app.evaluations import repository
from synthray.app.evaluations.schemas import (
    EvaluationAccepted,
    EvaluationCreate,
    EvaluationState,
)
from synthray.app.evaluations.tables import Evaluation
from synthray.app.jobs import service as jobs
from synthray.app.jobs.schemas import JobKind
from synthray.app.registry import service as registry
from synthray.app.storage import BlobStore
from synthray.config import Settings


def request_evaluation(
    session: Session, settings: Settings, req: EvaluationCreate, who: Principal
) -> EvaluationAccepted:
    mv = registry.resolve_version(session, req.model, req.version)
    classes = list(mv.classes)
    data = mv.config.get("data") or {}
    per_class = data.get("train_images_per_class")
    if per_class is not None and min(per_class) < 1:
        empty = [c for c, n in zip(classes, per_class, strict=True) if n < 1]
        raise Invalid(f"the generator's training set has no image of {empty}", field="model")
    test_id = None
    if req.test_dataset is not None:
        tv = datasets.resolve_version(session, req.test_dataset, req.test_dataset_version)
        missing = sorted(set(classes) - set(tv.classes))
        if missing:
            raise Invalid(
                f"the test dataset has no class {missing} of the generator's {classes}",
                field="test_dataset",
            )
        if tv.id == mv.dataset_version_id:
            raise Invalid(
                "the test dataset is the generator's own dataset version; omit it to use "
                "its held-out patients",
                field="test_dataset",
            )
        shared = datasets.shared_patients(session, mv.dataset_version_id, tv.id)
        if shared:
            raise Invalid(
                f"the test dataset shares {shared} patients with the generator's training "
                "split; a test set must hold unseen patients only",
                field="test_dataset",
            )
        test_id = tv.id
    elif req.test_dataset_version is not None:
        raise Invalid("test_dataset_version needs test_dataset", field="test_dataset_version")
    params = req.model_dump(exclude={"model", "version", "test_dataset", "test_dataset_version"})
    params["oversample"] = registry.oversample_for(mv, req.oversample, settings)
    params["choice"] = req.choice or settings.synthesis_choice
    evaluation = repository.add(
        session,
        Evaluation(
            model_version_id=mv.id,
            dataset_version_id=mv.dataset_version_id,
            test_dataset_version_id=test_id,
            params=params,
            code_version=code_version(),
            created_by=who.key_id,
        ),
    )
    job = jobs.create(
        session, settings, JobKind.evaluate, {"evaluation_id": evaluation.id}, who.key_id
    )
    evaluation.job_id = job.id
    audit.record(session, who, "request_evaluation", "evaluation", evaluation.id, "ok")
    session.flush()
    return EvaluationAccepted(evaluation_id=evaluation.id, job_id=job.id)


def get(session: Session, evaluation_id: int) -> Evaluation:
    e = repository.get(session, evaluation_id)
    if e is None:
        raise NotFound(f"evaluation {evaluation_id} not found")
    return e


def for_version(session: Session, model_version_id: int) -> Sequence[Evaluation]:
    return repository.for_version(session, model_version_id)


def latest_done(session: Session, model_version_id: int) -> Evaluation | None:
    """The newest finished evaluation of a generator version (for bundles)."""
    return repository.latest_done(session, model_version_id)


def start(session: Session, evaluation_id: int) -> Evaluation | None:
    """Mark it running; None when it is already done (a redelivered job)."""
    e = get(session, evaluation_id)
    if e.state == EvaluationState.done:
        return None
    e.state = EvaluationState.running
    session.flush()
    return e


def record_result(
    session: Session,
    blobs: BlobStore,
    evaluation_id: int,
    result: dict[str, Any],
    csv: str,
    chart_png: bytes,
) -> dict[str, Any]:
    """Store the result, its CSV and its chart, all three or none; the evaluation is done.
    Returns its summary."""
    e = get(session, evaluation_id)
    result_blob = blobs.put_bytes(json.dumps(result, indent=1).encode())[0]
    csv_blob = blobs.put_bytes(csv.encode())[0]
    chart_blob = blobs.put_bytes(chart_png)[0]
    e.result_blob, e.csv_blob, e.chart_blob = result_blob, csv_blob, chart_blob
    e.summary = summarize(result)
    e.state = EvaluationState.done
    session.flush()
    return dict(e.summary)


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Per arm: the headline figures with their intervals, and the difference to DS1."""
    return {
        "seeds": len(result["seeds"]),
        "test_images": result["test_images"],
        "arms": {
            arm: {
                metric: result["summary"][arm][metric]
                for metric in ("accuracy", "balanced_accuracy", "macro_auroc")
            }
            | {"vs_ds1": result["vs_ds1"].get(arm, {})}
            for arm in result["arms"]
        },
        "synthetic": result.get("synthetic", {}),
        "seconds": result.get("seconds"),
    }


def ended(session: Session, evaluation_id: int, state: str) -> None:
    """A queued or running evaluation takes the end state of its failed or cancelled job."""
    e = repository.get(session, evaluation_id)
    if e is not None and e.state in {EvaluationState.queued, EvaluationState.running}:
        e.state = EvaluationState(state)
        session.flush()


def artefact(session: Session, blobs: BlobStore, evaluation_id: int, which: str) -> bytes:
    """The stored ``result`` (JSON), ``csv`` or ``chart`` (PNG) of a finished evaluation."""
    e = get(session, evaluation_id)
    sha = {"result": e.result_blob, "csv": e.csv_blob, "chart": e.chart_blob}[which]
    if e.state != EvaluationState.done or sha is None:
        raise NotFound(f"evaluation {evaluation_id} has no result yet (state {e.state})")
    return blobs.read_bytes(sha)
