"""Clients that hold conversations with the service: each submits its next turn when the
previous one has ended, waiting on `Prefer: wait` (no polling delay)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass(frozen=True)
class TurnRecord:
    latency_s: float  # from the submit to the answer that shows the job ended
    job: dict[str, Any]


async def _conversation(
    client: httpx.AsyncClient, index: int, turns: int, generation: dict[str, Any]
) -> list[TurnRecord]:
    records: list[TurnRecord] = []
    conversation_id: str | None = None
    for turn in range(turns):
        body: dict[str, Any] = {
            "message": f"Conversation {index}, turn {turn}: tell me something new.",
            "generation": generation,
        }
        if conversation_id:
            body["conversation_id"] = conversation_id
        started = time.perf_counter()
        answer = await client.post("/v1/jobs", json=body)
        answer.raise_for_status()
        job = answer.json()
        while job["status"] in ("queued", "running"):
            answer = await client.get(f"/v1/jobs/{job['id']}", headers={"Prefer": "wait=30"})
            answer.raise_for_status()
            job = answer.json()
        records.append(TurnRecord(time.perf_counter() - started, job))
        if job["status"] != "succeeded":
            raise RuntimeError(f"turn ended {job['status']}: {job.get('error')}")
        conversation_id = job["conversation_id"]
    return records


async def _all(
    base_url: str, key: str, conversations: int, turns: int, generation: dict[str, Any]
) -> list[list[TurnRecord]]:
    limits = httpx.Limits(max_connections=conversations * 2)
    async with httpx.AsyncClient(
        base_url=base_url,
        headers={"Authorization": f"Bearer {key}"},
        timeout=120,
        limits=limits,
    ) as client:
        return list(
            await asyncio.gather(
                *(_conversation(client, i, turns, generation) for i in range(conversations))
            )
        )


def hold_conversations(
    base_url: str, key: str, *, conversations: int, turns: int, generation: dict[str, Any]
) -> tuple[list[list[TurnRecord]], float]:
    """Run the conversations concurrently; their records and the wall time in seconds."""
    started = time.perf_counter()
    records = asyncio.run(_all(base_url, key, conversations, turns, generation))
    return records, time.perf_counter() - started


def transcript(base_url: str, key: str, conversation_id: str) -> list[dict[str, Any]]:
    answer = httpx.get(
        f"{base_url}/v1/conversations/{conversation_id}/messages",
        params={"limit": 200},
        headers={"Authorization": f"Bearer {key}"},
    )
    answer.raise_for_status()
    return list(answer.json()["data"])
