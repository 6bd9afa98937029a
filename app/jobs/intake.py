"""A turn accepted, whichever route it came by (`POST /v1/jobs`, `POST /v1/responses`):
stored in one transaction on the API's async pool, then, once committed, sent to the broker
(invariant 2: enqueue only after commit).

The turns that arrive together are stored together: a group commit. Each of a few runners
takes every turn waiting when it is free, stores them in one transaction
(app.jobs.submission.store_turns) and answers each. Under a light load a turn is stored
alone, at once; under a heavy one, the turns that arrived while the runners were busy share
the next transaction, whose round trips and commit they pay once. No turn waits for others
to arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from psycopg import AsyncConnection
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

from app.config import Settings
from app.errors import ProblemError
from app.jobs.schemas import JobCreate
from app.jobs.submission import NewTurn, Submitted, UnsentCounts, store_turns
from app.logs import log_context
from app.metrics import JOBS_SUBMITTED, SUBMIT_GROUP_SIZE
from app.queue import RUN_TURN, send_now

log = logging.getLogger("parley.jobs")

# Runners storing groups at once, each on a connection of the async pool: enough that a
# group waiting on a lock (a tenant's, a conversation's) does not hold up every submit.
RUNNERS = 2
# The most turns in one transaction: a group's statements grow with it, and its answers all
# wait for its commit.
MAX_GROUP = 64

# Errors a group may owe to one of its turns rather than to the database: PostgreSQL refused
# a value, or broke a deadlock with another transaction. Its turns are then stored one by
# one, so that only the turn at fault fails.
_TURN_FAULTS = (psycopg.DataError, psycopg.IntegrityError, psycopg.errors.TransactionRollback)


@dataclass
class _Waiting:
    turn: NewTurn
    answer: asyncio.Future[Submitted]


class Intake:
    """This API process's group commit of submitted turns (app.state.intake)."""

    def __init__(
        self,
        pool: AsyncConnectionPool[AsyncConnection[TupleRow]],
        slots: asyncio.Semaphore,
        unsent: UnsentCounts,
    ) -> None:
        self._pool = pool
        self._slots = slots
        self._unsent = unsent
        self._queue: asyncio.Queue[_Waiting] = asyncio.Queue()
        self._runners: list[asyncio.Task[None]] = []
        self._stopped = False

    def start(self) -> None:
        self._runners = [asyncio.create_task(self._run()) for _ in range(RUNNERS)]

    async def stop(self) -> None:
        self._stopped = True
        for runner in self._runners:
            runner.cancel()
        for runner in self._runners:
            with contextlib.suppress(asyncio.CancelledError):
                await runner
        while not self._queue.empty():
            waiting = self._queue.get_nowait()
            if not waiting.answer.done():
                waiting.answer.set_exception(_stopping())

    async def submit(self, turn: NewTurn) -> Submitted:
        """Store `turn` (with those that arrive with it) and send it once committed."""
        if self._stopped:
            raise _stopping()
        answer: asyncio.Future[Submitted] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Waiting(turn, answer))
        try:
            return await asyncio.shield(answer)
        except asyncio.CancelledError:
            # A request cancelled meanwhile does not cancel its group: it ends once its turn
            # is stored or refused, so that what it does on the way out (an Idempotency-Key
            # freed unless a job holds it) sees which.
            with contextlib.suppress(Exception):
                await answer
            raise

    async def _run(self) -> None:
        while True:
            group = [await self._queue.get()]
            while len(group) < MAX_GROUP and not self._queue.empty():
                group.append(self._queue.get_nowait())
            try:
                await self._store(group)
            except BaseException as exc:
                # Each waiting request answers it (app.errors); a runner cancelled as the
                # service stops leaves none of them waiting.
                failure = exc if isinstance(exc, Exception) else _stopping()
                for waiting in group:
                    if not waiting.answer.done():
                        waiting.answer.set_exception(failure)
                if not isinstance(exc, Exception):
                    raise

    async def _store(self, group: Sequence[_Waiting]) -> None:
        try:
            async with self._slots, self._pool.connection() as conn, conn.transaction():
                outcomes = await store_turns(
                    conn, [waiting.turn for waiting in group], unsent=self._unsent
                )
        except _TURN_FAULTS:
            if len(group) == 1:
                raise
            log.warning("a group of %d turns failed; storing them one by one", len(group))
            for waiting in group:
                try:
                    await self._store([waiting])
                except Exception as exc:
                    if not waiting.answer.done():
                        waiting.answer.set_exception(exc)
            return
        SUBMIT_GROUP_SIZE.observe(len(group))
        sends = [o.job.id for o in outcomes if isinstance(o, Submitted) and o.send]
        failed = await run_in_threadpool(_send_all, sends) if sends else {}
        for waiting, outcome in zip(group, outcomes, strict=True):
            if waiting.answer.done():
                continue
            if isinstance(outcome, ProblemError):
                waiting.answer.set_exception(outcome)
            elif outcome.job.id in failed:
                waiting.answer.set_exception(failed[outcome.job.id])
            else:
                waiting.answer.set_result(outcome)


def _stopping() -> ProblemError:
    return ProblemError(503, "The service is stopping; retry.", headers={"Retry-After": "1"})


def _send_all(job_ids: Sequence[str]) -> dict[str, Exception]:
    """Committed: now the broker (its client blocks, so in a thread). Each job that could
    not be sent, with why: its request fails, and the reconciler sends it later."""
    failed: dict[str, Exception] = {}
    for job_id in job_ids:
        try:
            send_now(RUN_TURN, [job_id])
        except Exception as exc:
            failed[job_id] = exc
    return failed


async def accept(
    request: Request, *, tenant_id: str, body: JobCreate, settings: Settings, **options: Any
) -> Submitted:
    """Store the turn (a NewTurn, with its keyword `options`) and send it."""
    turn = NewTurn.of(tenant_id=tenant_id, request=body, settings=settings, **options)
    intake: Intake = request.app.state.intake
    submitted = await intake.submit(turn)
    JOBS_SUBMITTED.inc()
    with log_context(job_id=submitted.job.id):
        log.info(
            "job accepted: tenant %s, conversation %s, turn %d",
            tenant_id,
            submitted.job.conversation_id,
            submitted.turn,
        )
    return submitted
