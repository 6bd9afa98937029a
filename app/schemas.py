"""Field types and message shapes shared by the API's schemas and the worker."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, StringConstraints


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


class ChatMessage(BaseModel):
    """One message of a conversation as clients and prompts see it: in a Job, in the cached
    context, in a prompt's history (the engine reads any object with `role` and `content`)."""

    model_config = ConfigDict(frozen=True)

    role: Literal["user", "assistant"]
    content: str
