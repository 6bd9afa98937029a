from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel


class ConversationOut(BaseModel):
    id: str
    created_at: datetime
    updated_at: datetime
    system_prompt: str | None
    metadata: dict[str, str]
    message_count: int


class MessageOut(BaseModel):
    id: str
    seq: int
    role: Literal["user", "assistant"]
    content: str
    job_id: str
    created_at: datetime
