"""Cursor pagination: `?limit=&cursor=`, answered as `{"data": [...], "next_cursor": ...}`.

A cursor is the sort key of the last row served, base64-encoded JSON: opaque to clients,
stable under concurrent inserts (it names a position, not an offset).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Query
from pydantic import BaseModel

from app.errors import ProblemError

T = TypeVar("T")

LimitQuery = Annotated[int, Query(ge=1, le=200)]
CursorQuery = Annotated[str | None, Query(max_length=500)]


class Page(BaseModel, Generic[T]):
    data: list[T]
    next_cursor: str | None


def encode_cursor(values: list[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(values).encode()).decode().rstrip("=")


def _typed(value: Any, kind: type) -> Any:
    if isinstance(value, str) and not _storable(value):
        return None
    if kind is datetime:
        return datetime.fromisoformat(value) if isinstance(value, str) else None
    return value if type(value) is kind else None


def _storable(value: str) -> bool:
    # What PostgreSQL can compare: no NUL, and valid Unicode (no lone surrogates).
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in value


def decode_cursor(cursor: str | None, kinds: tuple[type, ...]) -> list[Any] | None:
    """The sort key in `cursor`, each part checked against `kinds`; a bad cursor is a 422."""
    if cursor is None:
        return None
    values: list[Any] | None = None
    try:
        raw = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if isinstance(raw, list) and len(raw) == len(kinds):
            values = [_typed(v, k) for v, k in zip(raw, kinds, strict=True)]
    except (binascii.Error, ValueError, UnicodeDecodeError):
        values = None
    if values is None or any(v is None for v in values):
        raise ProblemError(
            422, "The cursor is not valid.", errors=[{"loc": ["query", "cursor"], "msg": "invalid"}]
        )
    return values


def split_page(
    rows: list[T], limit: int, sort_key: Callable[[T], list[Any]]
) -> tuple[list[T], str | None]:
    """`rows` fetched with `limit + 1`: the page, and the cursor after it when more follow."""
    if len(rows) <= limit:
        return rows, None
    page = rows[:limit]
    return page, encode_cursor(sort_key(page[-1]))
