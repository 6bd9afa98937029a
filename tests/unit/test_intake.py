"""The group commit's runners (app.jobs.intake.Intake) as the API stops: no request is left
waiting on a turn that will never be stored."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from app.config import get_settings
from app.errors import ProblemError
from app.jobs.intake import Intake
from app.jobs.schemas import JobCreate
from app.jobs.submission import NewTurn, UnsentCounts


def _turn() -> NewTurn:
    body = JobCreate(message="hello")
    return NewTurn.of(tenant_id="acme", request=body, settings=get_settings())


def test_turns_in_flight_or_queued_when_the_api_stops_are_answered_503() -> None:
    async def run() -> list[BaseException | Any]:
        # No connection slot is ever free: the runners wait for one, holding their groups.
        intake = Intake(cast(Any, None), asyncio.Semaphore(0), UnsentCounts())
        intake.start()
        answers = [asyncio.ensure_future(intake.submit(_turn())) for _ in range(3)]
        await asyncio.sleep(0.05)
        await asyncio.wait_for(intake.stop(), timeout=5)
        return await asyncio.wait_for(asyncio.gather(*answers, return_exceptions=True), 5)

    outcomes = asyncio.run(run())
    assert len(outcomes) == 3
    for outcome in outcomes:
        assert isinstance(outcome, ProblemError) and outcome.status == 503


def test_a_turn_submitted_after_the_api_stopped_is_not_left_waiting() -> None:
    async def run() -> None:
        intake = Intake(cast(Any, None), asyncio.Semaphore(0), UnsentCounts())
        intake.start()
        await intake.stop()
        await asyncio.wait_for(intake.submit(_turn()), timeout=1)

    with pytest.raises(ProblemError):
        asyncio.run(run())
