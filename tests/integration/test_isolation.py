"""One tenant cannot reach another's rows, not even their locks; errors show no bound values."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError

from app.db import get_engine, session_scope
from app.models import Conversation
from tests.integration.helpers import Api

pytestmark = pytest.mark.integration


def test_naming_another_tenants_conversation_does_not_wait_for_its_lock(
    api_no_workers: Api,
) -> None:
    api = api_no_workers
    owner, stranger = api.create_key("acme"), api.create_key("globex")
    conversation = api.submit(owner, message="mine")["conversation_id"]
    answers: list[int] = []
    with session_scope() as holder:
        # The owner's conversation is locked, as a job end or a submit locks it.
        holder.execute(
            select(Conversation).where(Conversation.id == conversation).with_for_update()
        )

        def submit() -> None:
            body = {"message": "theirs?", "conversation_id": conversation}
            answers.append(api.request("POST", "/v1/jobs", stranger, json=body).status_code)

        thread = threading.Thread(target=submit)
        thread.start()
        thread.join(10)
        # Answered while the lock is still held: the other tenant never queued for it.
        assert not thread.is_alive(), "another tenant's submit waited for the owner's lock"
    assert answers == [404]


def test_database_errors_carry_no_bound_values(api_no_workers: Api) -> None:
    secret = "whsec_not_for_the_logs_0123456789"
    with pytest.raises(DBAPIError) as failure, get_engine().connect() as connection:
        # Fails whatever the value; the server's own message does not quote it.
        connection.execute(text("SELECT 1 / 0 WHERE :value IS NOT NULL"), {"value": secret})
    assert secret not in str(failure.value)
    assert "parameters hidden" in str(failure.value)
