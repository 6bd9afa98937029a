"""Column helpers shared by the tables."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel
from sqlalchemy import CheckConstraint, DateTime, Dialect, func
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


def sql_list(values: type[enum.StrEnum] | tuple[enum.StrEnum, ...]) -> str:
    """`'a', 'b'`: the enum's values for an SQL `IN (...)`, so that a status is spelled once."""
    return ", ".join(f"'{value.value}'" for value in values)


def one_of(column: str, values: type[enum.StrEnum]) -> CheckConstraint:
    """CHECK (column IN (the enum's values)), named after the column."""
    return CheckConstraint(f"{column} IN ({sql_list(values)})", name=column)


class PydanticJSONB(TypeDecorator[BaseModel]):
    """A JSONB column read and written as a pydantic model: code on both sides of the queue
    sees the model, never a dict read by string keys."""

    impl = JSONB
    cache_ok = True

    def __init__(self, model: type[BaseModel]) -> None:
        super().__init__()
        self.model = model

    def process_bind_param(self, value: BaseModel | None, dialect: Dialect) -> Any:
        return None if value is None else value.model_dump(mode="json")

    def process_result_value(self, value: Any, dialect: Dialect) -> BaseModel | None:
        return None if value is None else self.model.model_validate(value)


class CreatedAt:
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), default=utcnow
    )
