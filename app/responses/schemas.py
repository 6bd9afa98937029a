"""OpenAI's Responses API objects, as Parley serves them (api.md, "OpenAI-compatible
Responses API"): the request of `POST /v1/responses`, the response object, the model list."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from app.jobs.schemas import GenerationIn, Metadata, Temperature, TopP
from app.schemas import StorableText

ResponseStatus = Literal["queued", "in_progress", "completed", "incomplete", "failed", "cancelled"]
Role = Literal["user", "assistant", "system", "developer"]


class InputMessage(BaseModel):
    """One message of `input`. Content parts are checked by app.responses.service, so that
    a part of another kind (an image, a file) is a 400 saying so, not a schema error."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["message"] = "message"
    role: Role
    content: str | list[dict[str, Any]]


class ResponseCreate(BaseModel):
    # Unknown parameters are kept to be refused by name (a 400, as OpenAI answers them).
    model_config = ConfigDict(extra="allow")

    model: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    input: (
        Annotated[str, StringConstraints(min_length=1)]
        | Annotated[list[InputMessage], Field(min_length=1, max_length=200)]
    )
    instructions: Annotated[StorableText, StringConstraints(max_length=32_000)] | None = None
    previous_response_id: Annotated[str, StringConstraints(max_length=64)] | None = None
    background: bool = False
    stream: bool = False
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: Temperature = None
    top_p: TopP = None
    metadata: Metadata = Field(default_factory=dict)
    store: bool = True
    # Accepted only as what Parley does anyway: no tools, text output.
    tools: list[Any] = Field(default_factory=list)
    tool_choice: Any = None
    text: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def generation(self) -> GenerationIn:
        return GenerationIn(
            max_new_tokens=self.max_output_tokens, temperature=self.temperature, top_p=self.top_p
        )


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)


class ResponseError(BaseModel):
    code: str
    message: str


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: ResponseStatus
    model: str
    output: list[OutputMessage]
    usage: ResponseUsage | None = None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    previous_response_id: str | None = None
    instructions: str | None = None
    metadata: dict[str, str]
    background: bool | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    # What the SDKs read on every response: Parley runs no tools.
    tools: list[Any] = Field(default_factory=list)
    tool_choice: Literal["none"] = "none"
    parallel_tool_calls: bool = False


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "parley"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]
