"""What a worker process holds for its whole life: the model, the engine, the context store."""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass

from app.config import Settings, get_settings
from app.context.store import ContextStore
from app.logs import configure_logging
from app.redis import get_redis
from worker.inference.engine import Engine
from worker.inference.engine_process import EngineSpec, start_engine_process
from worker.turn_worker.cancel_watch import CancelWatch
from worker.turn_worker.event_publisher import EventPublisher
from worker.turn_worker.metrics import observe_prefix_cache, observe_step

log = logging.getLogger("parley.worker")


@dataclass
class Runtime:
    settings: Settings
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
        # The model runs in a process of its own, so that its loop never waits for the
        # interpreter lock this process's task threads hold (worker/inference/engine_process.py).
        engine = start_engine_process(
            EngineSpec(
                model_id=settings.model_id,
                max_batch=settings.worker_max_batch,
                prefill_tokens=settings.worker_prefill_tokens,
                prefix_cache_bytes=settings.worker_prefix_cache_mb * 2**20,
                max_context_tokens=settings.worker_max_context_tokens or None,
            ),
            on_step=observe_step,
            on_lost=_shut_down,
            setup=configure_logging,
        )
        log.info(
            "model %s loaded on %s in %.1fs (CUDA_VISIBLE_DEVICES=%s)",
            settings.model_id,
            engine.facts.device,
            time.perf_counter() - started,
            os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        )
        _runtime = Runtime(
            settings=settings,
            engine=engine,
            context=ContextStore(
                get_redis(),
                ttl_seconds=settings.context_ttl_seconds,
                max_messages=settings.context_max_messages,
            ),
            cancels=CancelWatch(get_redis()),
            events=EventPublisher(get_redis()),
        )
        if engine.prefix_cache is not None:
            observe_prefix_cache(engine.prefix_cache)
    return _runtime


def _shut_down() -> None:
    """The engine process ended under this worker (killed, out of memory): its turns in
    flight have failed and are retried; this worker shuts down warm, and its supervisor
    (`parley worker`) starts it again with a new engine."""
    log.error("the engine process is gone; shutting this worker down to be restarted")
    os.kill(os.getpid(), signal.SIGTERM)
