"""Field types shared by the request schemas."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, StringConstraints


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
