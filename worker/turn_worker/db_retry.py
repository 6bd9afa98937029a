"""Database calls of a turn that outlive a database blip: a restart, a failover, a pool that
is briefly exhausted. Retried with backoff (tenacity) rather than failing the turn, so that an
infrastructure fault neither loses the message's work nor burns one of the turn's attempts."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

log = logging.getLogger("parley.db_retry")

T = TypeVar("T")

# Errors of reaching the database, not of the statement: worth trying again.
TRANSIENT = (OperationalError, InterfaceError, PoolTimeoutError)
# Long enough for a restart or a failover; a turn's lease is renewed meanwhile.
GIVE_UP_AFTER_S = 120.0


def _say(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    log.warning("database unavailable (%s); retrying", type(error).__name__)


def with_db_retry(call: Callable[[], T]) -> T:
    """`call()`, tried again with backoff (0.2 s doubling to 5 s) while the database cannot
    be reached, for up to two minutes; then the last error is raised."""
    retrying = Retrying(
        retry=retry_if_exception_type(TRANSIENT),
        wait=wait_exponential(multiplier=0.2, max=5),
        stop=stop_after_delay(GIVE_UP_AFTER_S),
        before_sleep=_say,
        reraise=True,
    )
    return retrying(call)
