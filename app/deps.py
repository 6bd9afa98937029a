"""Request dependencies: the database session, the caller's key, the admin scope."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Annotated

import redis
from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.auth.service import Principal, authenticate
from app.config import Settings, get_settings
from app.db import get_sessionmaker
from app.errors import ProblemError
from app.redis import get_redis


def get_session() -> Iterator[Session]:
    """One session per request; the route commits, anything raised rolls back."""
    session = get_sessionmaker()()
    try:
        yield session
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]

_UNAUTHORIZED_HEADERS = {"WWW-Authenticate": "Bearer"}


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > 200:
        raise ProblemError(
            401,
            "A valid API key is required: Authorization: Bearer <key>.",
            headers=_UNAUTHORIZED_HEADERS,
        )
    return token


def _enforce_rate_limit(principal: Principal, settings: Settings) -> None:
    """A fixed one-minute window per key, counted in Redis."""
    limit = settings.rate_limit_per_minute
    if not limit:
        return
    now = time.time()
    counter = f"parley:rate:{principal.key_id}:{int(now // 60)}"
    try:
        pipe = get_redis().pipeline()
        pipe.incr(counter)
        pipe.expire(counter, 120)
        count = int(pipe.execute()[0])
    except redis.RedisError:
        # Fail open: an unavailable cache must not turn every request away.
        return
    if count > limit:
        raise ProblemError(
            429,
            f"This key is limited to {limit} requests a minute.",
            headers={"Retry-After": str(60 - int(now) % 60)},
        )


def current_principal(request: Request, session: SessionDep, settings: SettingsDep) -> Principal:
    principal = authenticate(session, secret=_bearer(request))
    if principal is None:
        raise ProblemError(401, "The API key is unknown or revoked.", headers=_UNAUTHORIZED_HEADERS)
    _enforce_rate_limit(principal, settings)
    request.state.principal = principal
    return principal


CurrentKey = Annotated[Principal, Depends(current_principal)]


def admin_principal(principal: CurrentKey) -> Principal:
    if not principal.is_admin:
        raise ProblemError(403, "This route needs an admin key.")
    return principal


AdminKey = Annotated[Principal, Depends(admin_principal)]
