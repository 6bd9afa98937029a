"""The engine's core in a process of its own: the model, its batching loop and its key/value
caches there; the worker's Celery task threads, which claim turns, build prompts, stream and
store replies, here.

In one process the batching loop shares the interpreter lock with every task thread, Celery's
consumer and the worker's publishers: on B2 (bench/b2_turn_overhead.py) a decoding step of 15
rows took 21.7 ms in the worker against 2.6 ms for the same engine alone. vLLM splits its API
server from its engine core for the same reason.

The two talk over one duplex pipe. The worker sends `submit`, `cancel`, `remember`,
`last_turn` (answered) and `stop`; after each pass of its loop (admission, prefill, a step) the
engine process sends what its requests did meanwhile in one message: new tokens, ends, the
batch's size, its steps and its prefix cache's counts. A request here mirrors the one there:
the same tokens, first-token time and end, so `Engine` streams and decodes it as if the loop
ran beside it.

Lifetimes: the engine process reads end-of-file on its pipe when the worker ends, however it
ends (`kill -9` included), and exits, so it never outlives the worker holding a GPU's memory.
When it ends under a running worker, the requests in flight fail and `on_lost` is called.
The process is spawned, never forked: CUDA starts only in it (invariant 6).
"""

from __future__ import annotations

import atexit
import itertools
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from worker.inference.engine import Engine, ModelFacts, make_loop, model_facts
from worker.inference.engine_loop import EngineLoop
from worker.inference.engine_types import (
    GenerationParams,
    NumericalError,
    PrefixCacheCounts,
    StepStats,
)
from worker.inference.loader import load_model, load_tokenizer
from worker.inference.prompt import Transcript
from worker.inference.request import GenerationRequest

log = logging.getLogger("parley.engine")

# How long a prompt waits for its conversation's last turn before it is built without it.
LAST_TURN_TIMEOUT_S = 5.0
# How long the engine process has to end its loop when asked to stop, before it is killed.
STOP_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class EngineSpec:
    """What the engine process loads and how it batches (the worker's settings)."""

    model_id: str
    max_batch: int = 16
    prefill_tokens: int = 512
    prefix_cache_bytes: int = 0
    # A cap on the model's context window: each batch slot holds this many tokens.
    max_context_tokens: int | None = None


class EngineFailure(RuntimeError):
    """An error the engine process met generating a request, by its name there."""


class EngineLost(RuntimeError):
    """The engine process ended: the requests it held will never end there."""


def start_engine_process(
    spec: EngineSpec,
    *,
    on_step: Callable[[StepStats], None] | None = None,
    on_lost: Callable[[], None] | None = None,
    setup: Callable[[], None] | None = None,
) -> Engine:
    """Start the engine process, load the model there (and its tokenizer here) and return
    the engine that feeds it. ``setup`` runs first there (logging), ``on_step`` here
    for each of its decoding steps, ``on_lost`` here if it ends under a running worker."""
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe(duplex=True)
    process = context.Process(
        target=serve, args=(theirs, spec, setup), name="parley-engine", daemon=True
    )
    process.start()
    theirs.close()  # only the engine process holds its end: our end reads EOF when it ends
    try:
        facts = _ready(ours, process)
    except BaseException:
        process.kill()
        raise
    tokenizer = load_tokenizer(spec.model_id)
    core = EngineProcess(
        process, ours, on_step=on_step, on_lost=on_lost, keeps_prefixes=spec.prefix_cache_bytes > 0
    )
    return Engine(tokenizer, facts, core)


def _ready(conn: Connection, process: BaseProcess) -> ModelFacts:
    """Wait for the engine process to have loaded its model (as long as it takes: a first
    download of a large checkpoint takes minutes), or to fail."""
    while not conn.poll(0.5):
        if not process.is_alive():
            raise RuntimeError(f"the engine process exited ({process.exitcode}) loading the model")
    try:
        message = conn.recv()
    except EOFError:
        process.join(5)
        raise RuntimeError(
            f"the engine process exited ({process.exitcode}) loading the model"
        ) from None
    if message[0] != "ready":
        raise RuntimeError(f"the engine process could not load the model: {message[1]}")
    facts: ModelFacts = message[1]
    return facts


class _Answer:
    def __init__(self) -> None:
        self.ready = threading.Event()
        self.value: Transcript | None = None

    def give(self, value: Transcript | None) -> None:
        self.value = value
        self.ready.set()


class EngineProcess:
    """The worker's side of the engine process (an `EngineCore`): requests are sent there and
    mirrored here as it reports on them."""

    def __init__(
        self,
        process: BaseProcess,
        conn: Connection,
        *,
        on_step: Callable[[StepStats], None] | None,
        on_lost: Callable[[], None] | None,
        keeps_prefixes: bool,
    ) -> None:
        self._process = process
        self._conn = conn
        self._on_step = on_step
        self._on_lost = on_lost
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()  # the requests in flight, the answers awaited, the end
        self._ids = itertools.count(1)
        self._requests: dict[int, GenerationRequest] = {}
        self._request_ids: dict[GenerationRequest, int] = {}
        self._answers: dict[int, _Answer] = {}
        self._lost: EngineLost | None = None
        self._stopping = False
        self._running = 0
        self._counts = PrefixCacheCounts() if keeps_prefixes else None
        self._reader = threading.Thread(target=self._read, name="parley-engine-pipe", daemon=True)
        self._reader.start()
        # Before multiprocessing's own exit handler, which would wait for the engine process
        # for ever: it ignores SIGTERM and ends when told to stop (or when this process has).
        atexit.register(self.stop)

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def running(self) -> int:
        return self._running

    @property
    def alive(self) -> bool:
        return self._lost is None and not self._stopping

    @property
    def prefix_cache(self) -> PrefixCacheCounts | None:
        return self._counts

    def submit(self, request: GenerationRequest) -> None:
        with self._lock:
            lost = self._lost
            if lost is None:
                request_id = next(self._ids)
                self._requests[request_id] = request
                self._request_ids[request] = request_id
        if lost is not None:
            request.fail(lost)
            return
        message = (
            "submit",
            request_id,
            request.input_ids,
            request.params,
            request.max_new_tokens,
            request.prefix_key,
            request.submitted_at,
        )
        if not self._send(message) and self._forget(request_id) is not None:
            request.fail(EngineLost("the engine process ended"))

    def cancel(self, request: GenerationRequest) -> None:
        request.cancel()
        with self._lock:
            request_id = self._request_ids.get(request)
        if request_id is not None:
            self._send(("cancel", request_id))

    def last_turn(self, prefix_key: str) -> Transcript | None:
        if self._counts is None:
            return None
        answer = _Answer()
        with self._lock:
            if self._lost is not None:
                return None
            call = next(self._ids)
            self._answers[call] = answer
        if self._send(("last_turn", call, prefix_key)):
            answer.ready.wait(LAST_TURN_TIMEOUT_S)
        with self._lock:
            self._answers.pop(call, None)
        return answer.value

    def remember(self, prefix_key: str, transcript: Transcript) -> None:
        self._send(("remember", prefix_key, transcript))

    def stop(self) -> None:
        """Ask the engine process to stop (its requests in flight fail) and wait for it."""
        with self._lock:
            self._stopping = True
        self._send(("stop",))
        self._process.join(STOP_TIMEOUT_S)
        if self._process.is_alive():
            log.warning("the engine process did not stop in %.0f s; killing it", STOP_TIMEOUT_S)
            self._process.kill()
            self._process.join(5)
        self._reader.join(5)

    def _send(self, message: tuple[Any, ...]) -> bool:
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError):  # the process is gone (or our end closed): reported
            return False  # by the reader, which sees the same end
        return True

    def _forget(self, request_id: int) -> GenerationRequest | None:
        """Take an ended request off the books; None if it was already."""
        with self._lock:
            request = self._requests.pop(request_id, None)
            if request is not None:
                self._request_ids.pop(request, None)
        return request

    # -- what the engine process reports, on the reader thread ------------------------------

    def _read(self) -> None:
        try:
            while True:
                message = self._conn.recv()
                if message[0] == "progress":
                    self._progress(*message[1:])
                elif message[0] == "answer":
                    with self._lock:
                        answer = self._answers.get(message[1])
                    if answer is not None:
                        answer.give(message[2])
        except (EOFError, OSError):
            pass
        self._process.join(5)
        self._lose(EngineLost(f"the engine process ended (exit code {self._process.exitcode})"))

    def _progress(
        self,
        events: list[tuple[int, str, Any, Any]],
        running: int,
        counts: tuple[int, int, int] | None,
        steps: list[StepStats],
    ) -> None:
        for request_id, kind, first, second in events:
            if kind == "tokens":
                generating = self._requests.get(request_id)
                if generating is not None:
                    for token in first:
                        generating.add_token(token, second)
                continue
            request = self._forget(request_id)
            if request is None:
                continue
            if kind == "finished":
                request.finish(first)
            else:
                request.fail(_error(first, second))
        self._running = running
        if counts is not None and self._counts is not None:
            self._counts.hits, self._counts.misses, self._counts.reused_tokens = counts
        if self._on_step is not None:
            for stats in steps:
                self._on_step(stats)

    def _lose(self, lost: EngineLost) -> None:
        with self._lock:
            self._lost = lost
            requests, self._requests, self._request_ids = list(self._requests.values()), {}, {}
            answers = list(self._answers.values())
            stopping = self._stopping
        for request in requests:
            request.fail(lost)
        for answer in answers:
            answer.give(None)
        self._running = 0
        if not stopping:
            log.error("%s; failing %d turns in flight", lost, len(requests))
            if self._on_lost is not None:
                self._on_lost()


def _error(name: str, text: str) -> BaseException:
    if name == NumericalError.__name__:
        return NumericalError(text)
    return EngineFailure(f"{name}: {text}")


# -- the engine process ----------------------------------------------------------------------


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
    # Nothing is left to save, and the interpreter's own teardown of torch took seconds more
    # (measured: 3.1 s after a kill -9 of the worker) while the process held the model.
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
