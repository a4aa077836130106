from __future__ import annotations

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
