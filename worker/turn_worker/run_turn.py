"""`parley.run_turn`: claim a job, build its prompt, generate, store the end.

Safe to run twice: the claim is a conditional update, and only the claimant (its token) can
store the end, in one transaction with the reply; the reply's unique key (conversation, seq)
forbids a second one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from celery.exceptions import Reject
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.context.store import Context
from app.db import session_scope
from app.jobs import lifecycle
from app.logs import log_context
from app.models import Conversation, Job, JobStatus, Message, reply_message_id, reply_seq
from app.models.base import utcnow
from app.schemas import ChatMessage
from worker.inference.engine import GenerationParams, GenerationResult
from worker.inference.engine_process import EngineFailure
from worker.inference.engine_types import NumericalError
from worker.inference.prompt import PromptTooLong, build_prompt
from worker.turn_worker import metrics
from worker.turn_worker.celery_app import app
from worker.turn_worker.db_retry import with_db_retry
from worker.turn_worker.held_claims import HELD
from worker.turn_worker.runtime import Runtime, start_runtime

log = logging.getLogger("parley.run_turn")


@dataclass(frozen=True)
class ClaimedTurn:
    """A claimed job and what generation needs, read in the claim's transaction."""

    claim: lifecycle.Claim
    conversation_id: str
    turn: int
    system_prompt: str | None
    message: str
    context: Context
    params: GenerationParams
    claimed_at: float = field(default_factory=time.monotonic)


class TurnFailed(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@app.task(name="parley.run_turn", ignore_result=True)
def run_turn(job_id: str) -> None:
    # Every log line of the turn, the engine's included, carries its job id (invariant 7).
    with log_context(job_id=job_id):
        _run(job_id)


def _run(job_id: str) -> None:
    runtime = start_runtime()
    if not runtime.engine.alive:
        # The engine process died and this worker is shutting down to be restarted: the turn
        # goes back to the queue unclaimed (no attempt spent) for a worker that can run it.
        raise Reject("this worker's engine is gone", requeue=True)
    # Through a database blip the claim is tried again: the message stays this task's.
    turn = with_db_retry(lambda: _claim(runtime, job_id))
    if turn is None:
        return
    log.info("claimed (attempt %d)", turn.claim.attempts)
    runtime.events.running(job_id)
    # While the turn runs, the heartbeat renews its lease: it is never taken over alive.
    HELD.add(turn.claim.token)
    try:
        _generate_and_end(runtime, turn)
    finally:
        HELD.discard(turn.claim.token)


def _generate_and_end(runtime: Runtime, turn: ClaimedTurn) -> None:
    try:
        result, context_messages = _generate(runtime, turn)
    except TurnFailed as failure:
        code, message = failure.code, failure.message
        with_db_retry(lambda: _finish_failed(runtime, turn, code, message))
    except Exception as exc:
        log.exception("generation failed")
        if turn.claim.attempts >= runtime.settings.max_turn_attempts:
            message = f"Generation failed: {failure_name(exc)}"
            with_db_retry(lambda: _finish_failed(runtime, turn, "generation_error", message))
        else:
            with_db_retry(lambda: _retry(turn))
    else:
        with_db_retry(lambda: _finish(runtime, turn, result, context_messages))


def failure_name(exc: Exception) -> str:
    """The name a failed turn's stored error gives its cause: an error in the engine process
    arrives here as EngineFailure, and is named as it was there."""
    return exc.name if isinstance(exc, EngineFailure) else type(exc).__name__


def _claim(runtime: Runtime, job_id: str) -> ClaimedTurn | None:
    settings = runtime.settings
    with session_scope() as session:
        claim = lifecycle.claim(session, job_id=job_id, lease_seconds=settings.turn_lease_seconds)
        if claim is None:
            log.info("not claimable (ended, running elsewhere or not next)")
            return None
        # What generation needs, in one read of plain rows: loading the job and its
        # conversation as ORM objects cost the claim as much again (B2: claim 10.5 ms of CPU).
        job = session.execute(
            select(
                Job.conversation_id,
                Job.turn,
                Job.generation,
                Job.created_at,
                Job.started_at,
                Conversation.system_prompt,
                Message.content,
            )
            .join(Conversation, Conversation.id == Job.conversation_id)
            .join(Message, (Message.job_id == Job.id) & (Message.role == "user"))
            .where(Job.id == job_id)
        ).one()
        context = runtime.context.load(
            session, conversation_id=job.conversation_id, before_turn=job.turn
        )
        if job.started_at is not None:
            metrics.QUEUE_WAIT.observe((job.started_at - job.created_at).total_seconds())
        generation = job.generation
        turn = ClaimedTurn(
            claim=claim,
            conversation_id=job.conversation_id,
            turn=job.turn,
            system_prompt=job.system_prompt,
            message=job.content,
            context=context,
            params=GenerationParams(
                max_new_tokens=generation.max_new_tokens,
                temperature=generation.temperature,
                top_p=generation.top_p,
                seed=generation.seed,
                time_limit_s=settings.generation_time_limit_seconds,
            ),
        )
    if claim.attempts > settings.max_turn_attempts:
        _finish_failed(runtime, turn, "too_many_attempts", "The turn was attempted too many times.")
        return None
    return turn


def _generate(runtime: Runtime, turn: ClaimedTurn) -> tuple[GenerationResult, int]:
    try:
        prompt = build_prompt(
            runtime.engine.tokenizer,
            system_prompt=turn.system_prompt,
            history=turn.context.messages,
            message=turn.message,
            max_context_tokens=runtime.engine.max_context_tokens,
            max_new_tokens=turn.params.max_new_tokens,
            last_turn=runtime.engine.last_turn(turn.conversation_id),
        )
    except PromptTooLong as exc:
        raise TurnFailed(
            "context_length_exceeded",
            "The system prompt and the message alone exceed the model's context window.",
        ) from exc
    try:
        with runtime.cancels.watching(turn.claim.job_id) as should_cancel:
            result = runtime.engine.generate(
                prompt,
                turn.params,
                should_cancel=should_cancel,
                prefix_key=turn.conversation_id,
                on_text=runtime.events.reply_shower(turn.claim.job_id, turn.claim.attempts),
            )
    except NumericalError as exc:
        # Not retried: the same model and settings would do it again.
        raise TurnFailed(
            "numerical_error",
            "The model gave no valid distribution for the next token (NaN or infinite "
            "scores); try other sampling settings.",
        ) from exc
    return result, prompt.context_messages


@contextmanager
def _owned(turn: ClaimedTurn) -> Iterator[tuple[Session, Conversation, Job] | None]:
    """One transaction over the turn's conversation (locked first, as every job end does) and
    its job, if this claim still owns it; None when the conversation was deleted or the job
    re-claimed, and then nothing may be stored."""
    with session_scope() as session:
        conversation = lifecycle.lock_conversation(session, turn.conversation_id)
        job = lifecycle.owned_job(session, turn.claim) if conversation is not None else None
        if conversation is None or job is None:
            log.info("no longer ours (deleted or re-claimed); storing nothing")
            yield None
        else:
            yield session, conversation, job


def _finish(
    runtime: Runtime, turn: ClaimedTurn, result: GenerationResult, context_messages: int
) -> None:
    job_id = turn.claim.job_id
    with _owned(turn) as owned:
        if owned is None:
            return
        session, conversation, job = owned
        job.context_messages = context_messages
        job.prompt_tokens = result.prompt_tokens
        job.completion_tokens = result.completion_tokens
        job.finish_reason = result.finish_reason
        succeeded = result.finish_reason != "cancelled" and not job.cancel_requested
        if succeeded:
            now = utcnow()
            session.add(
                Message(
                    id=reply_message_id(job_id),
                    conversation_id=turn.conversation_id,
                    job_id=job_id,
                    seq=reply_seq(turn.turn),
                    role="assistant",
                    content=result.text,
                    created_at=now,
                )
            )
            conversation.message_count += 1
            conversation.updated_at = now
        lifecycle.end_job(session, job, JobStatus.succeeded if succeeded else JobStatus.cancelled)
    if succeeded:
        added = [
            ChatMessage(role="user", content=turn.message),
            ChatMessage(role="assistant", content=result.text),
        ]
        runtime.context.extend(turn.conversation_id, turn.context, turn=turn.turn, added=added)
    _ended(runtime, turn, "succeeded" if succeeded else "cancelled")
    if result.time_to_first_token_s is not None:
        metrics.TIME_TO_FIRST_TOKEN.observe(result.time_to_first_token_s)
    log.info(
        "%s: %d prompt + %d completion tokens (%s)",
        "succeeded" if succeeded else "cancelled",
        result.prompt_tokens,
        result.completion_tokens,
        result.finish_reason,
    )


def _finish_failed(runtime: Runtime, turn: ClaimedTurn, code: str, message: str) -> None:
    with _owned(turn) as owned:
        if owned is None:
            return
        session, _, job = owned
        lifecycle.end_job(session, job, JobStatus.failed, error_code=code, error_message=message)
    log.warning("failed: %s", code)
    _ended(runtime, turn, "failed")


def _retry(turn: ClaimedTurn) -> None:
    with _owned(turn) as owned:
        if owned is None:
            return
        session, _, job = owned
        if job.cancel_requested:
            # A cancelled turn is not tried again: queued with the flag, no worker would
            # claim it and its conversation would wait behind it for ever.
            lifecycle.end_job(session, job, JobStatus.cancelled)
        else:
            lifecycle.requeue(session, job)


def _ended(runtime: Runtime, turn: ClaimedTurn, status: str) -> None:
    metrics.RUN_TIME.observe(time.monotonic() - turn.claimed_at)
    metrics.TURNS_ENDED.labels(status).inc()
    # Waiting clients and stream readers are told; they re-read the job now and then anyway.
    runtime.events.ended(turn.claim.job_id)
