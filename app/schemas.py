"""Field types and message shapes shared by the API's schemas and the worker."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
)


def _storable(value: str) -> str:
    # PostgreSQL text cannot hold NUL, and a lone surrogate has no UTF-8 form.
    if "\x00" in value:
        raise ValueError("must not contain the NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text") from None
    return value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be only whitespace")
    return value


def _rfc3339(value: object) -> object:
    # Pydantic reads a number as unix seconds: `until=2024` would mean 1970-01-01T00:33:44Z.
    if isinstance(value, str) and not re.match(r"\d{4}-\d{2}-\d{2}", value):
        raise ValueError("must be an RFC 3339 date-time, such as 2024-05-01T00:00:00Z")
    return value


# A time a client sends (api.md: RFC 3339; a date alone is its midnight, no offset is UTC).
Rfc3339 = Annotated[datetime, BeforeValidator(_rfc3339)]

StorableText = Annotated[str, AfterValidator(_storable)]
MessageText = Annotated[
    str,
    StringConstraints(min_length=1, max_length=32_000),
    AfterValidator(_storable),
    AfterValidator(_not_blank),
]
MetadataKey = Annotated[
    str, StringConstraints(min_length=1, max_length=64), AfterValidator(_storable)
]
MetadataValue = Annotated[str, StringConstraints(max_length=512), AfterValidator(_storable)]


class ChatMessage(BaseModel):
    """One message of a conversation as clients and prompts see it: in a Job, in the cached
    context, in a prompt's history (the engine reads any object with `role` and `content`)."""

    model_config = ConfigDict(frozen=True)

    role: Literal["user", "assistant"]
    content: str


class GenerationSettings(BaseModel):
    """A job's generation settings, the server's defaults filled in at submit: the API writes
    them to `jobs.generation` and the worker reads them back as this model."""

    model_config = ConfigDict(frozen=True)

    max_new_tokens: int = Field(ge=1)
    temperature: float = Field(default=0.0, ge=0.0)  # 0: greedy
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
