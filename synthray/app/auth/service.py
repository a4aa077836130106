"""API keys: random secrets, stored only as HMAC-SHA256 under the site secret.

A key looks like ``sr_<8 hex prefix>_<43 url-safe chars>``. The prefix is stored in
clear so operators can tell keys apart; the whole key is hashed with HMAC-SHA256 and
compared through a unique index (a constant-time comparison is unnecessary: the
lookup is by the digest of a 256-bit secret, not by a guessable value).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy.orm import Session

from synthray.app.auth import repository
from synthray.app.auth.schemas import KeyCreated, KeyRead, Principal, Role
from synthray.app.auth.tables import ApiKey
from synthray.app.db import utcnow
from synthray.app.errors import Conflict, Invalid, NotFound


def hash_key(secret_key: str, key: str) -> str:
    return hmac.new(secret_key.encode(), key.encode(), hashlib.sha256).hexdigest()


def create_key(
    session: Session, secret_key: str, name: str, role: Role, *, same_partner: bool = False
) -> KeyCreated:
    """A new key. A partner is known by its name (exports are addressed to it), so a partner
    key under a name that a partner key already carries, revoked or not, is refused unless
    ``same_partner`` says it is that partner's next key; ``same_partner`` for a name no
    partner has is refused too."""
    if role == Role.partner:
        existing = repository.partner_key_count(session, name)
        if existing and not same_partner:
            raise Conflict(
                "a partner of this name already has keys, and its exports are addressed to "
                "that name; to give that partner another key, set same_partner; for another "
                "partner, choose another name"
            )
        if same_partner and not existing:
            raise Invalid("no partner key has this name", field="same_partner")
    elif same_partner:
        raise Invalid("same_partner applies to partner keys only", field="same_partner")
    prefix = secrets.token_hex(4)
    key = f"sr_{prefix}_{secrets.token_urlsafe(32)}"
    row = repository.add(
        session,
        ApiKey(name=name, role=role, prefix=prefix, key_hash=hash_key(secret_key, key)),
    )
    return KeyCreated(**KeyRead.model_validate(row).model_dump(), key=key)


def authenticate(session: Session, secret_key: str, key: str) -> Principal | None:
    if not key.startswith("sr_") or len(key) > 200:
        return None
    row = repository.active_by_hash(session, hash_key(secret_key, key))
    if row is None:
        return None
    key_id, name, role = row
    return Principal(key_id=key_id, name=name, role=Role(role))


def principal_for(session: Session, key_id: int) -> Principal | None:
    """The principal of a key that is still valid (None once it is revoked)."""
    row = repository.get(session, key_id)
    if row is None or row.revoked_at is not None:
        return None
    return Principal(key_id=row.id, name=row.name, role=Role(row.role))


def active_partner_exists(session: Session, name: str) -> bool:
    """Whether an unrevoked partner key carries ``name`` (exports are addressed by it)."""
    return repository.active_partner_exists(session, name)


def list_keys(session: Session) -> list[KeyRead]:
    return [KeyRead.model_validate(k) for k in repository.list_all(session)]


def revoke_key(session: Session, key_id: int) -> KeyRead:
    row = repository.get(session, key_id)
    if row is None:
        raise NotFound(f"key {key_id} not found")
    if row.revoked_at is None:
        if row.role == Role.admin and repository.active_admin_ids(session) == [row.id]:
            raise Conflict(
                "this is the last active admin key; create another admin key first, "
                "or nobody could manage keys any more"
            )
        row.revoked_at = utcnow()
        session.flush()
    return KeyRead.model_validate(row)
