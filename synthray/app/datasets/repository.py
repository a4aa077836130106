from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session, selectinload

from synthray.app.datasets.schemas import DatasetVersionState
from synthray.app.datasets.tables import Dataset, DatasetImage, DatasetVersion
from synthray.app.db import lock_or_create


def get_by_name(session: Session, name: str, *, with_versions: bool = False) -> Dataset | None:
    """The dataset; ``with_versions`` also loads (or reloads) ``Dataset.versions``."""
    stmt = select(Dataset).where(Dataset.name == name)
    if with_versions:
        stmt = stmt.options(selectinload(Dataset.versions)).execution_options(
            populate_existing=True
        )
    return session.scalars(stmt).one_or_none()


def lock_or_add(session: Session, name: str) -> Dataset:
    """The dataset, created if new, locked while this transaction numbers a version."""
    return lock_or_create(session, Dataset, name=name)


def list_datasets(session: Session) -> list[Dataset]:
    """Every dataset, by name, with its versions loaded."""
    stmt = select(Dataset).order_by(Dataset.name).options(selectinload(Dataset.versions))
    return list(session.scalars(stmt.execution_options(populate_existing=True)))


def next_version(session: Session, dataset_id: int) -> int:
    stmt = select(func.max(DatasetVersion.version)).where(DatasetVersion.dataset_id == dataset_id)
    return (session.scalar(stmt) or 0) + 1


def add_version(session: Session, version: DatasetVersion) -> DatasetVersion:
    session.add(version)
    session.flush()
    return version


def get_version(session: Session, version_id: int) -> DatasetVersion | None:
    return session.get(DatasetVersion, version_id)


def get_dataset(session: Session, dataset_id: int) -> Dataset | None:
    return session.get(Dataset, dataset_id)


def find_version(session: Session, dataset_id: int, version: int | None) -> DatasetVersion | None:
    stmt = select(DatasetVersion).where(DatasetVersion.dataset_id == dataset_id)
    if version is None:
        stmt = stmt.where(DatasetVersion.state == DatasetVersionState.ready).order_by(
            DatasetVersion.version.desc()
        )
    else:
        stmt = stmt.where(DatasetVersion.version == version)
    return session.scalars(stmt.limit(1)).one_or_none()


def add_images(session: Session, rows: Sequence[dict[str, object]]) -> None:
    if rows:
        session.execute(insert(DatasetImage), list(rows))


def image_rows(session: Session, version_id: int) -> list[DatasetImage]:
    stmt = select(DatasetImage).where(DatasetImage.version_id == version_id)
    return list(session.scalars(stmt.order_by(DatasetImage.idx)))


def shared_patients(session: Session, train_version_id: int, other_version_id: int) -> int:
    """How many pseudonymous patients of the first version's training split have any
    image in the second version."""
    train = (
        select(DatasetImage.patient_key)
        .where(DatasetImage.version_id == train_version_id, DatasetImage.split == "train")
        .distinct()
    )
    other = (
        select(DatasetImage.patient_key)
        .where(DatasetImage.version_id == other_version_id)
        .distinct()
    )
    return len(set(session.scalars(train).all()) & set(session.scalars(other).all()))
