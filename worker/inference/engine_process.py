"""The engine's core in a process of its own: the model, its batching loop and its key/value
caches there (worker/inference/engine_host.py); the worker's Celery task threads, which claim
turns, build prompts, stream and store replies, here.

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
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from worker.inference.engine import Engine, ModelFacts
from worker.inference.engine_host import EngineSpec, serve
from worker.inference.engine_types import NumericalError, PrefixCacheCounts, StepStats
from worker.inference.loader import load_tokenizer
from worker.inference.prompt import Transcript
from worker.inference.request import GenerationRequest

log = logging.getLogger("parley.engine")

# How long a prompt waits for its conversation's last turn before it is built without it.
LAST_TURN_TIMEOUT_S = 5.0
# How long the engine process has to end its loop when asked to stop, before it is killed.
STOP_TIMEOUT_S = 15.0

__all__ = ["EngineFailure", "EngineLost", "EngineProcess", "EngineSpec", "start_engine_process"]


class EngineFailure(RuntimeError):
    """An error the engine process met generating a request; `name` is its type's name there
    (the text says "name: message")."""

    name = "EngineFailure"


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
    failure = EngineFailure(f"{name}: {text}")
    failure.name = name
    return failure
