"""`parley.run_turn`: claim a job, build its prompt, generate, store the end.

Safe to run twice: the claim is a conditional update, and only the claimant (its token) can
store the end, in one transaction with the reply; the reply's unique key (conversation, seq)
forbids a second one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from celery.exceptions import Reject

from app.context.store import Context
from app.db import session_scope
from app.jobs import lifecycle
from app.logs import log_context
from app.models import JobStatus
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

_NOT_OURS = "no longer ours (deleted or re-claimed); stored nothing"


@dataclass(frozen=True)
class ClaimedTurn:
    """A claimed job and what generation needs, read in the claim's transaction."""

    claim: lifecycle.Claim
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
        context = runtime.context.load(
            session,
            conversation_id=claim.conversation_id,
            before_turn=claim.turn,
            upto_turn=claim.context_upto,
        )
    metrics.QUEUE_WAIT.observe(claim.queued_s)
    generation = claim.generation
    turn = ClaimedTurn(
        claim=claim,
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
            system_prompt=turn.claim.system_prompt,
            history=turn.context.messages,
            message=turn.claim.message,
            max_context_tokens=runtime.engine.max_context_tokens,
            max_new_tokens=turn.params.max_new_tokens,
            last_turn=runtime.engine.last_turn(turn.claim.conversation_id),
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
                prefix_key=turn.claim.conversation_id,
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


def _finish(
    runtime: Runtime, turn: ClaimedTurn, result: GenerationResult, context_messages: int
) -> None:
    claim = turn.claim
    asked = JobStatus.cancelled if result.finish_reason == "cancelled" else JobStatus.succeeded
    outcome = lifecycle.Outcome(
        status=asked,
        reply=result.text,
        context_messages=context_messages,
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        finish_reason=result.finish_reason,
    )
    status = _store_end(turn, outcome)
    if status is None:
        return
    if status == JobStatus.succeeded:
        added = [
            ChatMessage(role="user", content=claim.message),
            ChatMessage(role="assistant", content=result.text),
        ]
        runtime.context.extend(claim.conversation_id, turn.context, turn=claim.turn, added=added)
    _ended(runtime, turn, status)
    if result.time_to_first_token_s is not None:
        metrics.TIME_TO_FIRST_TOKEN.observe(result.time_to_first_token_s)
    log.info(
        "%s: %d prompt + %d completion tokens (%s)",
        status,
        result.prompt_tokens,
        result.completion_tokens,
        result.finish_reason,
    )


def _finish_failed(runtime: Runtime, turn: ClaimedTurn, code: str, message: str) -> None:
    outcome = lifecycle.Outcome(JobStatus.failed, error_code=code, error_message=message)
    status = _store_end(turn, outcome)
    if status is None:
        return
    log.warning("failed: %s", code)
    _ended(runtime, turn, status)


def _store_end(turn: ClaimedTurn, outcome: lifecycle.Outcome) -> JobStatus | None:
    """Store the turn's end; the status stored, or None when the claim lost the job."""
    with session_scope() as session:
        status = lifecycle.end_claimed(session, turn.claim, outcome)
    if status is None:
        log.info(_NOT_OURS)
    return status


def _retry(turn: ClaimedTurn) -> None:
    with session_scope() as session:
        # Every job end takes the conversation's lock first, then the job's.
        conversation = lifecycle.lock_conversation(session, turn.claim.conversation_id)
        job = lifecycle.owned_job(session, turn.claim) if conversation is not None else None
        if job is None:
            log.info(_NOT_OURS)
        elif job.cancel_requested:
            # A cancelled turn is not tried again: queued with the flag, no worker would
            # claim it and its conversation would wait behind it for ever.
            lifecycle.end_job(session, job, JobStatus.cancelled)
        else:
            lifecycle.requeue(session, job)


def _ended(runtime: Runtime, turn: ClaimedTurn, status: JobStatus) -> None:
    metrics.RUN_TIME.observe(time.monotonic() - turn.claimed_at)
    metrics.TURNS_ENDED.labels(status).inc()
    # Waiting clients and stream readers are told; they re-read the job now and then anyway.
    runtime.events.ended(turn.claim.job_id)
