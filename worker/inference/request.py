"""One generation request as the engine's loop sees it: its prompt, limits, progress and state.

A request is made by a Celery task thread (worker/inference/engine.py), which then waits on it
and may ask for it to be cancelled; everything else about it is changed by the loop's single
thread. It is WAITING until the scheduler admits it, RUNNING while it is in the batch, and
ends once, FINISHED (with a finish reason) or FAILED (with an error); `finish` and `fail` are
the only ways to end it, so the waiting thread is woken in one place.
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass, field

import torch

from worker.inference.engine_types import FinishReason, GenerationParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # submitted, not yet admitted to the batch
    RUNNING = "running"  # admitted: prefilled and generating
    FINISHED = "finished"  # ended with a finish reason (cancelled included)
    FAILED = "failed"  # ended with an error: no reply

    @property
    def ended(self) -> bool:
        return self in (RequestStatus.FINISHED, RequestStatus.FAILED)


@dataclass(eq=False)
class GenerationRequest:
    input_ids: list[int]
    params: GenerationParams
    # params.max_new_tokens, or less where the context window leaves less room.
    max_new_tokens: int
    # The conversation: its key/value cache is kept for its next turn (prefix_cache.py).
    prefix_key: str | None = None
    generated: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    error: BaseException | None = None
    submitted_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    # Set by the sampler for a seeded sampled request: its own random stream.
    generator: torch.Generator | None = None
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)
    # Set at each new token and at the end: a waiting thread streaming the reply wakes then.
    _progress: threading.Event = field(default_factory=threading.Event, repr=False)

    def __post_init__(self) -> None:
        # The cap counts from submission: time spent waiting for a batch slot is the turn's too.
        self.deadline = self.submitted_at + self.params.time_limit_s

    # -- asked from the waiting thread ---------------------------------------------------

    def cancel(self) -> None:
        """Ask for the request to end; the loop ends it at its next step (or admission)."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the request to end; say whether it has."""
        return self._done.wait(timeout)

    def wait_for_progress(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a token or the end since the last call; say
        whether the request has ended. Read `generated` after it: nothing added is missed."""
        self._progress.wait(timeout)
        self._progress.clear()
        return self.status.ended

    # -- changed by the loop -------------------------------------------------------------

    def expired(self, now: float) -> bool:
        return now >= self.deadline

    def start(self) -> None:
        if self.status is RequestStatus.WAITING:
            self.status = RequestStatus.RUNNING

    def add_token(self, token: int, now: float) -> None:
        if self.first_token_at is None:
            self.first_token_at = now
        self.generated.append(token)
        self._progress.set()

    def finish(self, reason: FinishReason) -> None:
        if self.status.ended:  # a request ends once: a later failure of its batch is not its
            return
        self.status, self.finish_reason = RequestStatus.FINISHED, reason
        self._done.set()
        self._progress.set()

    def fail(self, error: BaseException) -> None:
        if self.status.ended:
            return
        self.status, self.error = RequestStatus.FAILED, error
        self._done.set()
        self._progress.set()
