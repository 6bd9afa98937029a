"""The Responses API on Parley's jobs: a response is a job (same id), and a chain of
`previous_response_id` is a conversation. Only what api.md lists is served; anything else a
request asks for (tools, other output types, store=false) is a 400 that says so."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from psycopg import AsyncConnection
from psycopg.rows import TupleRow
from pydantic import TypeAdapter, ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.errors import ProblemError
from app.ids import plausible_id
from app.jobs import service as jobs_service
from app.jobs.schemas import JobCreate
from app.models import Conversation, Job, JobStatus, Message, reply_message_id
from app.responses.schemas import (
    IncompleteDetails,
    InputMessage,
    OutputMessage,
    OutputText,
    ResponseCreate,
    ResponseError,
    ResponseObject,
    ResponseStatus,
    ResponseUsage,
)
from app.schemas import MessageText

_STATUS: dict[JobStatus, ResponseStatus] = {
    JobStatus.queued: "queued",
    JobStatus.running: "in_progress",
    JobStatus.succeeded: "completed",
    JobStatus.failed: "failed",
    JobStatus.cancelled: "cancelled",
}
_TEXT_PARTS = ("input_text", "output_text")
# An earlier message of an input transcript is stored as a message is (no NUL, valid text).
_MESSAGE: TypeAdapter[str] = TypeAdapter(MessageText)
# A turn's fields as the request names them.
_PARAMS = {"message": "input", "system_prompt": "instructions", "metadata": "metadata"}

# The turn a continued conversation's response follows: the previous response's.
PREVIOUS_TURN = """
SELECT conversation_id, turn FROM jobs WHERE id = %(id)s AND tenant_id = %(tenant)s
"""


@dataclass(frozen=True)
class Turn:
    """A response's request as a turn: the job to submit, and, for a new conversation, the
    (user, assistant) turns its input holds before the new message."""

    job: JobCreate
    earlier_turns: list[tuple[str, str]]


def bad_request(
    message: str, *, param: str | None = None, code: str = "invalid_request"
) -> ProblemError:
    return ProblemError(400, message, param=param, code=code)


def refuse_the_unsupported(body: ResponseCreate) -> None:
    """A 400 for what the request asks that Parley does not do."""
    for name in body.model_extra or {}:
        raise bad_request(
            f"Unsupported parameter: '{name}'. Parley serves text responses: model, input, "
            "instructions, previous_response_id, background, stream, max_output_tokens, "
            "temperature, top_p, metadata and store.",
            param=name,
            code="unsupported_parameter",
        )
    if body.tools:
        raise bad_request("Parley runs no tools: tools must be empty.", param="tools")
    if body.tool_choice not in (None, "none", "auto"):
        raise bad_request(
            "Parley runs no tools: tool_choice can only be none.", param="tool_choice"
        )
    text_format = (body.text or {}).get("format", {"type": "text"})
    if (
        not isinstance(text_format, dict)
        or text_format.get("type") != "text"
        or len(body.text or {}) > 1
    ):
        raise bad_request(
            "Parley answers in plain text only: text.format must be text.", param="text"
        )
    if not body.store:
        raise bad_request("Every response is stored: store can only be true.", param="store")
    if body.parallel_tool_calls:
        raise bad_request("Parley runs no tools.", param="parallel_tool_calls")


def check_limits(body: ResponseCreate, settings: Settings) -> None:
    """The server's limits, named as the request names them (the job's names are others)."""
    limit = settings.max_new_tokens_limit
    if body.max_output_tokens is not None and body.max_output_tokens > limit:
        raise ProblemError(
            422,
            f"max_output_tokens may be at most {limit}.",
            errors=[{"loc": ["body", "max_output_tokens"], "msg": "too large"}],
        )


def check_model(body: ResponseCreate, settings: Settings) -> None:
    if body.model != settings.served_model:
        raise ProblemError(
            404,
            f"The model '{body.model}' does not exist here; GET /v1/models lists what is served.",
            param="model",
            code="model_not_found",
        )


def as_turn(body: ResponseCreate, *, conversation_id: str | None) -> Turn:
    """The request's input as a turn of a new conversation (conversation_id None) or of the
    previous response's."""
    messages = (
        [InputMessage(role="user", content=body.input)]
        if isinstance(body.input, str)
        else body.input
    )
    texts = [(m.role, _text(m, index)) for index, m in enumerate(messages)]
    system = [body.instructions] if body.instructions else []
    while texts and texts[0][0] in ("system", "developer"):
        system.append(texts.pop(0)[1])
    if not texts or texts[-1][0] != "user":
        raise bad_request("input must end with a user message.", param="input")
    *earlier, (_, message) = texts
    if any(role in ("system", "developer") for role, _ in earlier):
        raise bad_request("System and developer messages can only open the input.", param="input")
    pairs = list(zip(earlier[0::2], earlier[1::2], strict=False))
    if len(earlier) % 2 or any(u[0] != "user" or a[0] != "assistant" for u, a in pairs):
        raise bad_request(
            "The messages before the last must alternate user, assistant, starting with user.",
            param="input",
        )
    if conversation_id is not None and (system or earlier):
        raise bad_request(
            "With previous_response_id, input is the new user message only (no instructions, "
            "system or earlier messages: the conversation has them).",
            param="input" if earlier else "instructions",
        )
    generation = body.generation()  # its fields were validated as the request's
    try:
        job = JobCreate(
            message=message,
            conversation_id=conversation_id,
            system_prompt="\n\n".join(system) if system else None,
            generation=generation,
            metadata=body.metadata,
        )
    except ValidationError as exc:
        raise _invalid(exc) from None
    try:
        earlier_turns = [
            (_MESSAGE.validate_python(u[1]), _MESSAGE.validate_python(a[1])) for u, a in pairs
        ]
    except ValidationError as exc:
        raise _invalid(exc) from None
    return Turn(job, earlier_turns)


def _invalid(exc: ValidationError) -> ProblemError:
    """A 422 naming the request's parameter: a turn's field by its name here (`_PARAMS`),
    anything else (an earlier message of the input) as `input`."""
    return ProblemError(
        422,
        "The request is not valid.",
        errors=[
            {
                "loc": ["body", _PARAMS.get(str(e["loc"][0]) if e["loc"] else "", "input")],
                "msg": str(e["msg"])[:300],
            }
            for e in exc.errors()
        ],
    )


def _text(message: InputMessage, index: int) -> str:
    if isinstance(message.content, str):
        return message.content
    parts = []
    for number, part in enumerate(message.content):
        if part.get("type") not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            raise bad_request(
                "Parley reads text only: each content part is input_text (or output_text).",
                param=f"input[{index}].content[{number}]",
            )
        parts.append(part["text"])
    return "".join(parts)


async def previous_turn(
    conn: AsyncConnection[TupleRow], *, tenant_id: str, response_id: str
) -> tuple[str, int]:
    """The conversation and turn of the tenant's response `response_id` (else 404)."""
    row = None
    if plausible_id(response_id):
        query = {"id": response_id, "tenant": tenant_id}
        row = await (await conn.execute(PREVIOUS_TURN, query)).fetchone()
    if row is None:
        raise ProblemError(
            404,
            f"No response '{response_id}' was found.",
            param="previous_response_id",
            code="not_found",
        )
    return str(row[0]), int(row[1])


def get_job(session: Session, *, tenant_id: str | None, response_id: str) -> Job:
    try:
        return jobs_service.get_job(session, tenant_id=tenant_id, job_id=response_id)
    except ProblemError:
        raise ProblemError(
            404, f"No response '{response_id}' was found.", code="not_found"
        ) from None


def to_response(session: Session, job: Job, *, model: str) -> ResponseObject:
    """The job as a response object."""
    status = JobStatus(job.status)
    system_prompt = session.execute(
        select(Conversation.system_prompt).where(Conversation.id == job.conversation_id)
    ).scalar_one_or_none()
    previous = session.execute(
        select(Job.id).where(Job.conversation_id == job.conversation_id, Job.turn == job.turn - 1)
    ).scalar_one_or_none()
    output: list[OutputMessage] = []
    cut = job.finish_reason == "length"
    if status == JobStatus.succeeded:
        reply = session.execute(
            select(Message.content).where(Message.job_id == job.id, Message.role == "assistant")
        ).scalar_one_or_none()
        output.append(
            OutputMessage(
                id=reply_message_id(job.id),
                status="incomplete" if cut else "completed",
                content=[OutputText(text=reply or "")],
            )
        )
    return ResponseObject(
        id=job.id,
        created_at=_unix(job.created_at),
        status="incomplete" if status == JobStatus.succeeded and cut else _STATUS[status],
        model=model,
        output=output,
        usage=None
        if job.prompt_tokens is None or job.completion_tokens is None
        else ResponseUsage(
            input_tokens=job.prompt_tokens,
            output_tokens=job.completion_tokens,
            total_tokens=job.prompt_tokens + job.completion_tokens,
        ),
        error=ResponseError(code=job.error_code or "server_error", message=job.error_message or "")
        if status == JobStatus.failed
        else None,
        incomplete_details=IncompleteDetails(reason="max_output_tokens")
        if status == JobStatus.succeeded and cut
        else None,
        previous_response_id=previous,
        instructions=system_prompt,
        metadata=job.metadata_,
        background=job.background,
        max_output_tokens=job.generation.max_new_tokens,
        temperature=job.generation.temperature,
        top_p=job.generation.top_p,
    )


def _unix(moment: datetime) -> int:
    return int(moment.timestamp())
