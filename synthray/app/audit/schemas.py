from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict


class AuditRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    seq: int
    at: datetime
    actor_key_id: int | None
    actor_name: str | None
    action: str
    object_type: str
    object_id: str | None
    outcome: str
    detail: dict[str, Any]
    hash: str


@dataclass(frozen=True)
class AuditFilter:
    """Which records to list (every field optional; all given must match)."""

    object_type: str | None = None
    action: str | None = None
    actor: str | None = None
    outcome: str | None = None
    object_id: str | None = None
