"""What a worker process holds for its whole life: the model, the engine, the context store."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from app.config import Settings, get_settings
from app.context.store import ContextStore
from app.redis import get_redis
from worker.inference.engine import Engine
from worker.inference.loader import LoadedModel, load_model
from worker.turn_worker.cancel_watch import CancelWatch
from worker.turn_worker.event_publisher import EventPublisher
from worker.turn_worker.metrics import observe_prefix_cache, observe_step

log = logging.getLogger("parley.worker")


@dataclass
class Runtime:
    settings: Settings
    model: LoadedModel
    engine: Engine
    context: ContextStore
    cancels: CancelWatch
    events: EventPublisher


_runtime: Runtime | None = None


def current_runtime() -> Runtime | None:
    return _runtime


def start_runtime() -> Runtime:
    global _runtime
    if _runtime is None:
        settings = get_settings()
        if not settings.model_id:
            raise RuntimeError("MODEL_ID is not set: a worker needs a model to serve")
        started = time.perf_counter()
        model = load_model(settings.model_id)
        if settings.worker_max_context_tokens:
            # The key/value cache holds this many tokens for every batch slot: a model with a
            # long window (128k) would not fit it on the GPU at its full length.
            model.max_context_tokens = min(
                model.max_context_tokens, settings.worker_max_context_tokens
            )
        log.info(
            "model %s loaded on %s in %.1fs (CUDA_VISIBLE_DEVICES=%s)",
            settings.model_id,
            model.device,
            time.perf_counter() - started,
            os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        )
        _runtime = Runtime(
            settings=settings,
            model=model,
            engine=Engine(
                model,
                max_batch=settings.worker_max_batch,
                prefill_tokens=settings.worker_prefill_tokens,
                on_step=observe_step,
                prefix_cache_bytes=settings.worker_prefix_cache_mb * 2**20,
            ),
            context=ContextStore(
                get_redis(),
                ttl_seconds=settings.context_ttl_seconds,
                max_messages=settings.context_max_messages,
            ),
            cancels=CancelWatch(get_redis()),
            events=EventPublisher(get_redis()),
        )
        if _runtime.engine.prefix_cache is not None:
            observe_prefix_cache(_runtime.engine.prefix_cache)
    return _runtime
