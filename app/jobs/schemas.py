from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from app.models import JobStatus
from app.schemas import ChatMessage, MessageText, MetadataKey, MetadataValue, StorableText
from app.webhooks.schemas import WebhookState

MIN_TEMPERATURE = 0.01

Metadata = Annotated[dict[MetadataKey, MetadataValue], Field(max_length=16)]


def numerically_safe_temperature(value: float | None) -> float | None:
    # Logits divided by a temperature near zero overflow to infinity and sampling fails:
    # 0 means greedy, anything else starts at MIN_TEMPERATURE.
    if value is not None and 0 < value < MIN_TEMPERATURE:
        raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}")
    return value


Temperature = Annotated[
    float | None,
    Field(ge=0.0, le=2.0, allow_inf_nan=False),
    AfterValidator(numerically_safe_temperature),
]
TopP = Annotated[float | None, Field(gt=0.0, le=1.0, allow_inf_nan=False)]


class GenerationIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int | None = Field(default=None, ge=1)
    temperature: Temperature = None
    top_p: TopP = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message: MessageText
    conversation_id: str | None = None
    system_prompt: Annotated[StorableText, StringConstraints(max_length=32_000)] | None = None
    webhook_url: (
        Annotated[StorableText, StringConstraints(min_length=1, max_length=2048)] | None
    ) = None
    generation: GenerationIn | None = None
    metadata: Metadata = Field(default_factory=dict)


class JobError(BaseModel):
    code: str
    message: str


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class JobOut(BaseModel):
    id: str
    conversation_id: str
    status: JobStatus
    message: ChatMessage
    reply: ChatMessage | None = None
    error: JobError | None = None
    context_messages: int | None = None
    usage: Usage | None = None
    queue_position: int | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    webhook: WebhookState | None = None
    metadata: dict[str, str]
