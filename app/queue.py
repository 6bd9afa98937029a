"""The send-only task client. Tasks are sent by name (the API never imports `worker/`),
and only after the transaction that wrote their rows has committed (invariant 2)."""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

from celery import Celery
from sqlalchemy import event
from sqlalchemy.orm import Session

from app.config import get_settings
from celeryconfig import celery_config

log = logging.getLogger("parley.queue")

RUN_TURN = "parley.run_turn"

_PENDING = "parley_pending_tasks"


@lru_cache
def get_client() -> Celery:
    client = Celery("parley-client")
    client.conf.update(celery_config(get_settings()))
    return client


def send_now(task: str, args: list[Any]) -> None:
    get_client().send_task(task, args=args)


def enqueue_after_commit(session: Session, task: str, args: list[Any]) -> None:
    """Send `task` once the session's current transaction commits; drop it on rollback."""
    pending: list[tuple[str, list[Any]]] = session.info.setdefault(_PENDING, [])
    pending.append((task, args))


@event.listens_for(Session, "after_commit")
def _send_pending(session: Session) -> None:
    pending: list[tuple[str, list[Any]]] = session.info.pop(_PENDING, [])
    for task, args in pending:
        try:
            send_now(task, args)
        except Exception:
            # The rows are committed; the reconciler re-sends what never reached the broker.
            log.exception("could not send %s%s; the reconciler will re-send it", task, args)


@event.listens_for(Session, "after_rollback")
def _drop_pending(session: Session) -> None:
    session.info.pop(_PENDING, None)
