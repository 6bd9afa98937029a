"""/v1/admin/keys: the operator manages API keys (the auth domain's service does the work)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from sqlalchemy import select

from app.auth import service
from app.auth.schemas import KeyCreate, KeyCreated, KeyOut
from app.deps import AdminKey, SessionDep
from app.errors import not_found
from app.ids import plausible_id
from app.models import ApiKey, Scope
from app.pagination import CursorQuery, LimitQuery, Page, decode_cursor, split_page

router = APIRouter(prefix="/v1/admin/keys", tags=["admin"])


def _out(key: ApiKey) -> KeyOut:
    return KeyOut(
        id=key.id,
        tenant=key.tenant_id,
        scope=key.scope,
        name=key.name,
        prefix=key.key_prefix,
        created_at=key.created_at,
        revoked_at=key.revoked_at,
    )


@router.post("", status_code=201, response_model=KeyCreated)
def create_key(body: KeyCreate, _: AdminKey, session: SessionDep) -> KeyCreated:
    """Issue a key. Its value is shown in this answer only."""
    key, secret = service.create_key(
        session, tenant_id=body.tenant, scope=Scope(body.scope), name=body.name
    )
    session.commit()
    return KeyCreated(
        id=key.id,
        key=secret,
        tenant=key.tenant_id,
        scope=body.scope,
        name=key.name,
        created_at=key.created_at,
    )


@router.get("", response_model=Page[KeyOut])
def list_keys(
    _: AdminKey, session: SessionDep, limit: LimitQuery = 50, cursor: CursorQuery = None
) -> Page[KeyOut]:
    """Every key, oldest first (ids are time-ordered), revoked ones included."""
    query = select(ApiKey).order_by(ApiKey.id).limit(limit + 1)
    after = decode_cursor(cursor, (str,))
    if after is not None:
        query = query.where(ApiKey.id > after[0])
    rows, next_cursor = split_page(list(session.execute(query).scalars()), limit, lambda k: [k.id])
    return Page(data=[_out(k) for k in rows], next_cursor=next_cursor)


@router.delete("/{key_id}", status_code=204)
def revoke_key(key_id: str, _: AdminKey, session: SessionDep) -> Response:
    """Revoke a key: from now on it is answered 401."""
    if not plausible_id(key_id) or not service.revoke_key(session, key_id=key_id):
        raise not_found("Key")
    session.commit()
    return Response(status_code=204)
