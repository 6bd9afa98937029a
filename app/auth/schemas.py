from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from app.schemas import StorableText

TenantName = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
]


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant: TenantName
    scope: Literal["client", "admin"] = "client"
    name: Annotated[StorableText, StringConstraints(max_length=200)] = ""


class KeyOut(BaseModel):
    id: str
    tenant: str
    scope: Literal["client", "admin"]
    name: str
    prefix: str = Field(
        description="The key's public identifier, the start of the key (pk_1a2b3c), which is "
        "no part of its secret; for a key its operator chose (PARLEY_ADMIN_KEY), a "
        "fingerprint of its SHA-256 digest (sha256:1a2b3c)."
    )
    created_at: datetime
    revoked_at: datetime | None = None


class KeyCreated(BaseModel):
    id: str
    key: str
    tenant: str
    scope: Literal["client", "admin"]
    name: str
    created_at: datetime
