"""Storing accepted turns, a group at a time: the submits of the same moment share one
transaction (app.jobs.intake gathers them) whose statements each take the whole group
(app.jobs.repository). The tenants' loads are one read, the conversations continued are
locked in one and lengthened in one write, the jobs and their messages are one insert: a
group pays the round trips, the statements' overhead and the commit once, whatever its size
(B1: about half the CPU per submit, in the API and in PostgreSQL, of a transaction each).

Each turn still gets its own answer. A turn refused (404, 409, 429) writes nothing, and the
others of its group are stored as if it had not been there: every check is made in the
group's order with counts that include the turns placed before it.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb

from app.config import Settings
from app.errors import ProblemError, not_found
from app.ids import new_id, plausible_id
from app.jobs import fair_share, repository
from app.jobs.schemas import JobCreate, JobOut
from app.models import JobStatus, reply_message_id, reply_seq, user_seq
from app.models.base import utcnow
from app.schemas import ChatMessage, GenerationSettings
from app.webhooks.schemas import WebhookState


def resolve_generation(request: JobCreate, settings: Settings) -> GenerationSettings:
    """The request's generation settings with the server's defaults filled in."""
    gen = request.generation
    max_new = gen.max_new_tokens if gen and gen.max_new_tokens is not None else None
    if max_new is not None and max_new > settings.max_new_tokens_limit:
        raise ProblemError(
            422,
            f"generation.max_new_tokens may be at most {settings.max_new_tokens_limit}.",
            errors=[{"loc": ["body", "generation", "max_new_tokens"], "msg": "too large"}],
        )
    return GenerationSettings(
        max_new_tokens=max_new or settings.default_max_new_tokens,
        temperature=gen.temperature if gen and gen.temperature is not None else 0.0,
        top_p=gen.top_p if gen and gen.top_p is not None else 1.0,
        seed=gen.seed if gen else None,
    )


@dataclass(frozen=True)
class NewTurn:
    """A turn a client sent, checked on its own (`of`); the rest of its checks need the
    database. A new conversation may start with `earlier_turns`, (user message, reply) pairs
    stored as turns that succeeded; a turn of an existing one, given `follows_turn`, must come
    right after that turn (else 409: another turn was accepted since). `background` is stored
    as the Responses API's request said."""

    tenant_id: str
    request: JobCreate
    generation: GenerationSettings
    # The tenant's limits when the request came (app.config.Settings).
    limit: int
    share: int
    idempotency_key: str | None = None
    earlier_turns: Sequence[tuple[str, str]] = ()
    follows_turn: int | None = None
    background: bool | None = None

    @classmethod
    def of(
        cls,
        *,
        tenant_id: str,
        request: JobCreate,
        settings: Settings,
        idempotency_key: str | None = None,
        earlier_turns: Sequence[tuple[str, str]] = (),
        follows_turn: int | None = None,
        background: bool | None = None,
    ) -> NewTurn:
        if request.conversation_id is not None and request.system_prompt is not None:
            raise ProblemError(
                422,
                "system_prompt can only be given when starting a new conversation.",
                errors=[
                    {"loc": ["body", "system_prompt"], "msg": "not allowed with conversation_id"}
                ],
            )
        return cls(
            tenant_id=tenant_id,
            request=request,
            generation=resolve_generation(request, settings),
            limit=settings.max_unfinished_jobs_per_tenant,
            share=settings.fair_share(tenant_id),
            idempotency_key=idempotency_key,
            earlier_turns=earlier_turns,
            follows_turn=follows_turn,
            background=background,
        )


@dataclass(frozen=True)
class Submitted:
    job: JobOut
    turn: int
    # The job is its conversation's next and within its tenant's share: the caller sends it
    # to the workers once the transaction has committed.
    send: bool


Outcome = Submitted | ProblemError


@dataclass
class _Load:
    """A tenant's unfinished jobs and jobs sent and waiting, with the group's counted in."""

    unfinished: int
    sent: int


@dataclass
class _Placed:
    """A turn that passed its checks: its conversation, its number, and what it will be."""

    index: int
    turn: NewTurn
    conversation_id: str
    number: int
    new_conversation: bool
    job_id: str = ""
    ready: bool = True
    send: bool = False


async def store_turns(
    conn: AsyncConnection[TupleRow], turns: Sequence[NewTurn], *, unsent: UnsentCounts
) -> list[Outcome]:
    """Store `turns` in `conn`'s transaction, which the caller commits: for each, in order,
    what was stored (Submitted) or why it was refused (a ProblemError, raised by no one)."""
    now = utcnow()
    outcomes: list[Outcome | None] = [None] * len(turns)
    continued = await _lock_conversations(conn, turns)
    loads = await _tenant_loads(conn, turns)
    placed: list[_Placed] = []
    for index, turn in enumerate(turns):
        refused = _place(index, turn, loads[turn.tenant_id], continued, placed)
        if refused is not None:
            outcomes[index] = refused
    # Ids in the group's order: new_id orders by the millisecond alone, and the group's jobs
    # share their moment, so their order among the tenant's held jobs (released by ready_at,
    # then id; counted ahead by created_at, then id) would otherwise be random.
    for place, job_id in zip(placed, sorted(new_id("job") for _ in placed), strict=True):
        place.job_id = job_id
    await _write_conversations(conn, placed, now)
    await _find_the_waiting(conn, placed)
    await _decide_sends(conn, placed, loads)
    await _write_jobs(conn, placed, now)
    for place, job in zip(placed, await _present(conn, placed, now, unsent), strict=True):
        outcomes[place.index] = Submitted(job=job, turn=place.number, send=place.send)
    assert all(outcome is not None for outcome in outcomes)
    return [outcome for outcome in outcomes if outcome is not None]


async def _lock_conversations(
    conn: AsyncConnection[TupleRow], turns: Sequence[NewTurn]
) -> dict[tuple[str, str], int]:
    """The conversations the turns continue, locked: (tenant, id) -> its turns so far. One
    that is not there (or not the tenant's) is missing."""
    wanted = sorted(
        {
            (turn.tenant_id, turn.request.conversation_id)
            for turn in turns
            if turn.request.conversation_id is not None
            and plausible_id(turn.request.conversation_id)
        }
    )
    if not wanted:
        return {}
    params = {"ids": [id_ for _, id_ in wanted], "tenants": [tenant for tenant, _ in wanted]}
    rows = await (await conn.execute(repository.LOCK_CONVERSATIONS, params)).fetchall()
    return {(str(tenant), str(id_)): int(count) for id_, tenant, count in rows}


async def _tenant_loads(
    conn: AsyncConnection[TupleRow], turns: Sequence[NewTurn]
) -> dict[str, _Load]:
    limits = {turn.tenant_id: (turn.limit, turn.share) for turn in turns}
    params = {
        "tenants": list(limits),
        "limits": [limit for limit, _ in limits.values()],
        "shares": [share for _, share in limits.values()],
    }
    rows = await (await conn.execute(repository.TENANT_LOADS, params)).fetchall()
    return {str(tenant): _Load(int(unfinished), int(sent)) for tenant, unfinished, sent in rows}


def _place(
    index: int,
    turn: NewTurn,
    load: _Load,
    continued: dict[tuple[str, str], int],
    placed: list[_Placed],
) -> ProblemError | None:
    """The checks of one turn, against the counts of the turns placed before it; if it
    passes, it is placed (and counted)."""
    if load.unfinished >= turn.limit:
        return ProblemError(
            429,
            f"This tenant has {turn.limit} unfinished jobs, the most allowed; "
            "retry when some have ended.",
            headers={"Retry-After": "5"},
        )
    conversation_id = turn.request.conversation_id
    if conversation_id is None:
        number = len(turn.earlier_turns) + 1
        placed.append(_Placed(index, turn, new_id("conv"), number, new_conversation=True))
    else:
        key = (turn.tenant_id, conversation_id)
        if key not in continued:
            return not_found("Conversation")
        number = continued[key] + 1
        if turn.follows_turn is not None and number != turn.follows_turn + 1:
            return ProblemError(
                409, "The previous response is not its conversation's latest any more."
            )
        continued[key] = number
        placed.append(_Placed(index, turn, conversation_id, number, new_conversation=False))
    load.unfinished += 1
    return None


async def _write_conversations(
    conn: AsyncConnection[TupleRow], placed: Sequence[_Placed], now: datetime
) -> None:
    """The new conversations, with their imported turns, and the continued ones lengthened."""
    new = [place for place in placed if place.new_conversation]
    if new:
        await conn.execute(
            repository.NEW_CONVERSATIONS,
            {
                "ids": [place.conversation_id for place in new],
                "tenants": [place.turn.tenant_id for place in new],
                "system_prompts": [place.turn.request.system_prompt for place in new],
                "metadata": [Jsonb(dict(place.turn.request.metadata)) for place in new],
                "turns": [place.number for place in new],
                "now": now,
            },
        )
    for place in new:
        for number, (message, reply) in enumerate(place.turn.earlier_turns, start=1):
            await _import_turn(conn, place, number, message=message, reply=reply, now=now)
    added: defaultdict[str, int] = defaultdict(int)
    for place in placed:
        if not place.new_conversation:
            added[place.conversation_id] += 1
    if added:
        params = {"ids": list(added), "added": list(added.values()), "now": now}
        await conn.execute(repository.ADD_TURNS, params)


async def _import_turn(
    conn: AsyncConnection[TupleRow],
    place: _Placed,
    number: int,
    *,
    message: str,
    reply: str,
    now: datetime,
) -> None:
    job_id = new_id("job")
    await conn.execute(
        repository.IMPORTED_TURN,
        {
            "id": job_id,
            "tenant": place.turn.tenant_id,
            "conversation": place.conversation_id,
            "turn": number,
            "generation": Jsonb(place.turn.generation.model_dump(mode="json")),
            "metadata": Jsonb({}),
            "now": now,
            "user_id": new_id("msg"),
            "user_seq": user_seq(number),
            "user": message,
            "reply_id": reply_message_id(job_id),
            "reply_seq": reply_seq(number),
            "reply": reply,
        },
    )


async def _find_the_waiting(conn: AsyncConnection[TupleRow], placed: Sequence[_Placed]) -> None:
    """Marks the turns that wait for an earlier turn of their conversation (not ready): one
    still unfinished in the database, or one placed before them in this group."""
    first: dict[str, _Placed] = {}
    for place in placed:
        if place.new_conversation:
            continue
        if place.conversation_id in first:
            place.ready = False
        else:
            first[place.conversation_id] = place
    if not first:
        return
    params = {
        "ids": list(first),
        "turns": [place.number for place in first.values()],
    }
    rows = await (await conn.execute(repository.EARLIER_UNFINISHED, params)).fetchall()
    for (conversation_id,) in rows:
        first[str(conversation_id)].ready = False


async def _decide_sends(
    conn: AsyncConnection[TupleRow], placed: Sequence[_Placed], loads: dict[str, _Load]
) -> None:
    """Which ready turns go to the broker now, and which are held (app.jobs.fair_share)."""
    at_share: list[_Placed] = []
    for place in placed:
        if not place.ready:
            continue
        load = loads[place.turn.tenant_id]
        if load.sent < place.turn.share:
            place.send = True
            load.sent += 1
        else:
            at_share.append(place)
    if not at_share:
        return
    # At the share: decide under the tenants' locks, against counts that see every start
    # committed before them (fair_share.has_room), plus the group's own sends.
    shares = {place.turn.tenant_id: place.turn.share for place in at_share}
    tenants = list(shares)
    locks = {"namespace": fair_share.LOCK_NAMESPACE, "tenants": tenants}
    await conn.execute(repository.TENANT_LOCKS, locks)
    recount = {"tenants": tenants, "shares": list(shares.values())}
    rows = await (await conn.execute(repository.SENT_WAITING, recount)).fetchall()
    grouped = {place.turn.tenant_id: 0 for place in at_share}
    for place in placed:
        if place.send and place.turn.tenant_id in grouped:
            grouped[place.turn.tenant_id] += 1
    sent = {str(tenant): int(count) + grouped[str(tenant)] for tenant, count in rows}
    for place in at_share:
        tenant = place.turn.tenant_id
        if sent[tenant] < place.turn.share:
            place.send = True
            sent[tenant] += 1


async def _write_jobs(
    conn: AsyncConnection[TupleRow], placed: Sequence[_Placed], now: datetime
) -> None:
    """The jobs and their users' messages; and the Idempotency-Keys they answer, done."""
    if not placed:
        return
    await conn.execute(
        repository.NEW_JOBS,
        {
            "ids": [place.job_id for place in placed],
            "tenants": [place.turn.tenant_id for place in placed],
            "conversations": [place.conversation_id for place in placed],
            "turns": [place.number for place in placed],
            "generations": [
                Jsonb(place.turn.generation.model_dump(mode="json")) for place in placed
            ],
            "metadata": [Jsonb(dict(place.turn.request.metadata)) for place in placed],
            "webhook_urls": [place.turn.request.webhook_url for place in placed],
            "ready": [place.ready for place in placed],
            "sent": [place.send for place in placed],
            "backgrounds": [place.turn.background for place in placed],
            "message_ids": [new_id("msg") for _ in placed],
            "seqs": [user_seq(place.number) for place in placed],
            "contents": [place.turn.request.message for place in placed],
            "now": now,
        },
    )
    keyed = [place for place in placed if place.turn.idempotency_key is not None]
    if keyed:
        done: dict[str, Any] = {
            "jobs": [place.job_id for place in keyed],
            "tenants": [place.turn.tenant_id for place in keyed],
            "keys": [place.turn.idempotency_key for place in keyed],
        }
        await conn.execute(repository.IDEMPOTENCY_DONE, done)


async def _present(
    conn: AsyncConnection[TupleRow],
    placed: Sequence[_Placed],
    now: datetime,
    unsent: UnsentCounts,
) -> list[JobOut]:
    """Each stored job as its 202 shows it, with its queue position: fair_share's
    sent_position or held_position, the other tenants' backlogs from `unsent`."""
    positions: dict[str, int] = {}
    sent = [place.job_id for place in placed if place.send]
    if sent:
        params = {"ids": sent, "at": now}
        rows = await (await conn.execute(repository.SENT_BEFORE, params)).fetchall()
        positions.update((str(job_id), int(before)) for job_id, before in rows)
    held = [place for place in placed if not place.send]
    if held:
        params = {
            "ids": [place.job_id for place in held],
            "tenants": [place.turn.tenant_id for place in held],
            "at": now,
        }
        rows = await (await conn.execute(repository.SENT_AND_OWN_UNSENT_BEFORE, params)).fetchall()
        backlogs = await unsent.get(conn)
        tenants = {place.job_id: place.turn.tenant_id for place in held}
        for job_id, sent_jobs, own_ahead in rows:
            positions[str(job_id)] = fair_share.position_when_held(
                tenants[str(job_id)],
                sent=int(sent_jobs),
                own_ahead=int(own_ahead),
                unsent=backlogs,
            )
    return [
        JobOut(
            id=place.job_id,
            conversation_id=place.conversation_id,
            status=JobStatus.queued,
            message=ChatMessage(role="user", content=place.turn.request.message),
            queue_position=positions[place.job_id],
            created_at=now,
            webhook=None
            if place.turn.request.webhook_url is None
            else WebhookState(url=place.turn.request.webhook_url, status="pending", attempts=0),
            metadata=dict(place.turn.request.metadata),
        )
        for place in placed
    ]


class UnsentCounts:
    """Per tenant, its queued jobs not sent to the broker, read at most once a second by this
    process (app.jobs.intake.Intake). A submit's queue_position weighs the other tenants'
    backlogs with these, a second old at most (the position is an estimate, api.md says so):
    counting every held job for each submit cost it more than all its other statements."""

    MAX_AGE_S = 1.0

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._read_at = -math.inf
        self._lock = asyncio.Lock()

    async def get(self, conn: AsyncConnection[TupleRow]) -> dict[str, int]:
        if time.monotonic() - self._read_at > self.MAX_AGE_S:
            async with self._lock:
                if time.monotonic() - self._read_at > self.MAX_AGE_S:
                    rows = await (await conn.execute(repository.UNSENT_BY_TENANT)).fetchall()
                    self._counts = {str(tenant): int(count) for tenant, count in rows}
                    self._read_at = time.monotonic()
        return self._counts
