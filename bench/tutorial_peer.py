"""The FastAPI + Celery service every tutorial writes, for B1 to measure Parley against.

`POST /chat` takes a message, sends a Celery task with it (`task.delay()`) and answers the
task's id: no key, no durable row, no conversation, nothing to poll but Celery's result
backend. It is what a 202 costs when it promises nothing; B1 runs it under the same load as
Parley's `POST /v1/jobs`, one process each.

Run: PEER_BROKER_URL=redis://127.0.0.1:6379/14 uvicorn bench.tutorial_peer:app
"""

from __future__ import annotations

import os

from celery import Celery
from fastapi import FastAPI
from pydantic import BaseModel

celery_app = Celery("tutorial", broker=os.environ.get("PEER_BROKER_URL", "redis://"))


@celery_app.task(name="tutorial.generate")  # type: ignore[untyped-decorator]
def generate(message: str) -> str:
    # The tutorial's worker would run the model here; B1 measures accepting work only.
    return message


class ChatRequest(BaseModel):
    message: str


app = FastAPI(title="tutorial chat service")


@app.post("/chat", status_code=202)
def chat(request: ChatRequest) -> dict[str, str]:
    task = generate.delay(request.message)
    return {"task_id": str(task.id)}
