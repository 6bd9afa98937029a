"""The engine process's own side (worker/inference/engine_process.py has the worker's): load the
model, run the batching loop, take requests from the pipe and report, once per pass of the
loop, what they did.

It ends when the worker says stop or when its end of the pipe closes (the worker is gone,
however it went), and never on a signal meant for the worker's group: the worker decides when
generation stops.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from worker.inference.engine import make_loop, model_facts
from worker.inference.engine_loop import EngineLoop
from worker.inference.engine_types import GenerationParams, StepStats
from worker.inference.loader import load_model
from worker.inference.request import GenerationRequest

log = logging.getLogger("parley.engine")


@dataclass(frozen=True)
class EngineSpec:
    """What the engine process loads and how it batches (the worker's settings)."""

    model_id: str
    max_batch: int = 16
    prefill_tokens: int = 512
    prefix_cache_bytes: int = 0
    # A cap on the model's context window: each batch slot holds this many tokens.
    max_context_tokens: int | None = None


def serve(conn: Connection, spec: EngineSpec, setup: Callable[[], None] | None) -> None:
    """The engine process: load the model, then run requests until told to stop or until
    the worker is gone."""
    # Ctrl-C reaches the whole process group, and a service manager's SIGTERM often the
    # whole group too: the worker decides when generation stops (its warm shutdown lets the
    # turns in flight end, then says stop), and this process ends with it in any case.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if setup is not None:
        setup()
    started = time.perf_counter()
    relay = _Relay(conn)
    try:
        loaded = load_model(spec.model_id)
        if spec.max_context_tokens:
            # The key/value cache holds this many tokens for every batch slot: a model with a
            # long window (128k) would not fit it on the GPU at its full length.
            loaded.max_context_tokens = min(loaded.max_context_tokens, spec.max_context_tokens)
        facts = model_facts(loaded)
        loop = make_loop(
            loaded,
            facts,
            max_batch=spec.max_batch,
            prefill_tokens=spec.prefill_tokens,
            prefix_cache_bytes=spec.prefix_cache_bytes,
            on_step=relay.stepped,
            on_iteration=relay.flush,
        )
    except Exception as exc:
        log.exception("the engine could not load %s", spec.model_id)
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    relay.loop = loop
    log.info(
        "engine process: model %s on %s in %.1fs",
        spec.model_id,
        loaded.device,
        time.perf_counter() - started,
    )
    conn.send(("ready", facts))
    relay.serve()
    loop.stop()
    # Nothing is left to save: the process ends at once, holding the model no longer than
    # its loop needed to stop, rather than through the interpreter's teardown.
    logging.shutdown()
    os._exit(0)


class _Relay:
    """The engine process's side of the pipe: requests in, what they did out."""

    def __init__(self, conn: Connection) -> None:
        self.loop: EngineLoop | None = None
        self._conn = conn
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._live: dict[int, GenerationRequest] = {}
        self._sent: dict[int, int] = {}  # request id -> its tokens already reported
        self._steps: list[StepStats] = []
        self._reported: tuple[int, tuple[int, int, int] | None] | None = None

    def serve(self) -> None:
        """Take the worker's messages until it says stop or its end of the pipe closes."""
        loop = self.loop
        assert loop is not None
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                log.warning("the worker is gone; the engine process stops")
                return
            kind = message[0]
            if kind == "submit":
                self._submit(loop, *message[1:])
            elif kind == "cancel":
                with self._lock:
                    request = self._live.get(message[1])
                if request is not None:
                    request.cancel()
            elif kind == "remember":
                loop.remember(message[1], message[2])
            elif kind == "last_turn":
                self._send(("answer", message[1], loop.last_turn(message[2])))
            elif kind == "stop":
                return

    def _submit(
        self,
        loop: EngineLoop,
        request_id: int,
        input_ids: list[int],
        params: GenerationParams,
        max_new_tokens: int,
        prefix_key: str | None,
        submitted_at: float,
    ) -> None:
        request = GenerationRequest(
            input_ids, params, max_new_tokens, prefix_key=prefix_key, submitted_at=submitted_at
        )
        with self._lock:
            self._live[request_id] = request
            self._sent[request_id] = 0
        loop.submit(request)

    def stepped(self, stats: StepStats) -> None:
        self._steps.append(stats)

    def flush(self) -> None:
        """On the loop's thread after each pass: report new tokens and ends in one message."""
        events: list[tuple[int, str, Any, Any]] = []
        with self._lock:
            live = list(self._live.items())
        ended = []
        for request_id, request in live:
            sent = self._sent[request_id]
            if len(request.generated) > sent:
                events.append(
                    (request_id, "tokens", request.generated[sent:], request.first_token_at)
                )
                self._sent[request_id] = len(request.generated)
            if request.status.ended:
                ended.append(request_id)
                if request.error is not None:
                    error = request.error
                    events.append((request_id, "failed", type(error).__name__, str(error)))
                else:
                    events.append((request_id, "finished", request.finish_reason, None))
        if ended:
            with self._lock:
                for request_id in ended:
                    del self._live[request_id], self._sent[request_id]
        loop = self.loop
        cache = None if loop is None else loop.prefix_cache
        counts = None if cache is None else (cache.hits, cache.misses, cache.reused_tokens)
        state = (0 if loop is None else loop.running, counts)
        if not events and not self._steps and state == self._reported:
            return
        steps, self._steps = self._steps, []
        self._reported = state
        self._send(("progress", events, state[0], counts, steps))

    def _send(self, message: tuple[Any, ...]) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError):
            pass  # the worker is gone: `serve` reads the end and stops
