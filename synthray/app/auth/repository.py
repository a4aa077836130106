from __future__ import annotations

from sqlalchemy import bindparam, func, select
from sqlalchemy.orm import Session

from synthray.app.auth.schemas import Role
from synthray.app.auth.tables import ApiKey


def add(session: Session, key: ApiKey) -> ApiKey:
    session.add(key)
    session.flush()
    return key


def by_hash(session: Session, key_hash: str) -> ApiKey | None:
    return session.scalars(select(ApiKey).where(ApiKey.key_hash == key_hash)).one_or_none()


_KEYS = ApiKey.__table__
_ACTIVE_BY_HASH = select(_KEYS.c.id, _KEYS.c.name, _KEYS.c.role).where(
    _KEYS.c.key_hash == bindparam("key_hash"), _KEYS.c.revoked_at.is_(None)
)


def active_by_hash(session: Session, key_hash: str) -> tuple[int, str, str] | None:
    """(id, name, role) of the unrevoked key with this hash. Every request that presents
    a key asks this, so it is a Core statement on the session's connection: through the
    ORM the same lookup cost about six times as much (123 us against 21 us on SQLite)."""
    row = session.connection().execute(_ACTIVE_BY_HASH, {"key_hash": key_hash}).one_or_none()
    return None if row is None else (int(row[0]), str(row[1]), str(row[2]))


def active_partner_exists(session: Session, name: str) -> bool:
    stmt = select(ApiKey.id).where(
        ApiKey.name == name, ApiKey.role == Role.partner, ApiKey.revoked_at.is_(None)
    )
    return session.scalars(stmt).first() is not None


def partner_key_count(session: Session, name: str) -> int:
    """Partner keys ever created under ``name``, revoked ones included."""
    stmt = select(func.count()).where(ApiKey.name == name, ApiKey.role == Role.partner)
    return int(session.scalar(stmt) or 0)


def active_admin_ids(session: Session) -> list[int]:
    """Ids of the admin keys not revoked, locked until the transaction ends (so that two
    revocations cannot each leave the other as the last admin)."""
    stmt = select(ApiKey.id).where(ApiKey.role == Role.admin, ApiKey.revoked_at.is_(None))
    return list(session.scalars(stmt.with_for_update()))


def list_all(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id)))


def get(session: Session, key_id: int) -> ApiKey | None:
    return session.get(ApiKey, key_id)
