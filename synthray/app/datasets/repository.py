from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from synthray.app.datasets.tables import Dataset, DatasetImage, DatasetVersion


def get_by_name(session: Session, name: str) -> Dataset | None:
    return session.scalars(select(Dataset).where(Dataset.name == name)).one_or_none()


def add_dataset(session: Session, name: str) -> Dataset:
    ds = Dataset(name=name)
    session.add(ds)
    session.flush()
    return ds


def list_datasets(session: Session) -> list[Dataset]:
    return list(session.scalars(select(Dataset).order_by(Dataset.name)))


def next_version(session: Session, dataset_id: int) -> int:
    stmt = select(func.max(DatasetVersion.version)).where(DatasetVersion.dataset_id == dataset_id)
    return (session.scalar(stmt) or 0) + 1


def add_version(session: Session, version: DatasetVersion) -> DatasetVersion:
    session.add(version)
    session.flush()
    return version


def versions_of(session: Session, dataset_id: int) -> list[DatasetVersion]:
    stmt = (
        select(DatasetVersion)
        .where(DatasetVersion.dataset_id == dataset_id)
        .order_by(DatasetVersion.version)
    )
    return list(session.scalars(stmt))


def get_version(session: Session, version_id: int) -> DatasetVersion | None:
    return session.get(DatasetVersion, version_id)


def get_dataset(session: Session, dataset_id: int) -> Dataset | None:
    return session.get(Dataset, dataset_id)


def find_version(session: Session, dataset_id: int, version: int | None) -> DatasetVersion | None:
    stmt = select(DatasetVersion).where(DatasetVersion.dataset_id == dataset_id)
    if version is None:
        stmt = stmt.where(DatasetVersion.state == "ready").order_by(DatasetVersion.version.desc())
    else:
        stmt = stmt.where(DatasetVersion.version == version)
    return session.scalars(stmt.limit(1)).one_or_none()


def add_images(session: Session, rows: Sequence[dict[str, object]]) -> None:
    if rows:
        session.execute(insert(DatasetImage), list(rows))


def image_rows(session: Session, version_id: int) -> list[DatasetImage]:
    stmt = select(DatasetImage).where(DatasetImage.version_id == version_id)
    return list(session.scalars(stmt.order_by(DatasetImage.idx)))
