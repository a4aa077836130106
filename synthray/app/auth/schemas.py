from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from synthray.app.fields import Flag, RequestModel


class Role(StrEnum):
    admin = "admin"
    operator = "operator"
    reviewer = "reviewer"
    partner = "partner"


class KeyCreate(RequestModel):
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.\-]+$")
    role: Role
    same_partner: Flag = Field(
        False,
        description="For a partner key whose name a partner key already carries (revoked or "
        "not): true gives that partner another key, which sees its exports (rotation). "
        "Without it such a name is refused (409), so a new partner never inherits an old "
        "one's exports by its name.",
    )


class KeyRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    role: Role
    prefix: str
    created_at: datetime
    revoked_at: datetime | None


class KeyCreated(KeyRead):
    key: str = Field(description="The secret. Shown once; only its HMAC is stored.")


class Principal(BaseModel):
    """Who is calling: the key's id, name and role (never the secret)."""

    key_id: int
    name: str
    role: Role
