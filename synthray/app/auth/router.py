from __future__ import annotations

from fastapi import APIRouter, status

from synthray.app.audit import service as audit
from synthray.app.auth import service
from synthray.app.auth.schemas import KeyCreate, KeyCreated, KeyRead, Principal
from synthray.app.deps import AdminDep, CurrentPrincipal, SessionDep, SettingsDep, reads_only
from synthray.app.fields import RowId

router = APIRouter(tags=["auth"])


@router.get("/me", response_model=Principal)
async def me(who: CurrentPrincipal) -> Principal:
    return who


@router.post("/keys", response_model=KeyCreated, status_code=status.HTTP_201_CREATED)
def create_key(
    body: KeyCreate, session: SessionDep, settings: SettingsDep, who: AdminDep
) -> KeyCreated:
    created = service.create_key(
        session, settings.secret_key, body.name, body.role, same_partner=body.same_partner
    )
    detail = {"role": body.role, "same_partner": body.same_partner}
    audit.record(session, who, "create_key", "api_key", created.id, "ok", detail)
    return created


@router.get("/keys", response_model=list[KeyRead])
@reads_only
def list_keys(session: SessionDep, _: AdminDep) -> list[KeyRead]:
    return service.list_keys(session)


@router.delete("/keys/{key_id}", response_model=KeyRead)
def revoke_key(key_id: RowId, session: SessionDep, who: AdminDep) -> KeyRead:
    revoked = service.revoke_key(session, key_id)
    audit.record(session, who, "revoke_key", "api_key", key_id, "ok")
    return revoked
