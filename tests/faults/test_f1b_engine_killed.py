"""F1b: `kill -9` a worker's engine process (the process that holds the model,
worker/inference/engine_process.py) while turns generate. The worker fails the turns it had in
flight (each is tried again), shuts itself down, and its supervisor starts it again with a new
engine: every turn ends, once."""

from __future__ import annotations

from collections.abc import Callable

import psutil
import pytest

from bench.cpu_budget import is_engine_process
from tests.faults.harness import FaultWorld, report

CONVERSATIONS = 16
TURNS = 2
# Long enough that turns are generating when the engine dies: at 48, on a fast day, the last
# turns had ended by the time the kill came (every turn terminal, none retried).
NEW_TOKENS = 160


def _engine_process(supervisor_pid: int) -> psutil.Process:
    """The engine process under the supervisor's worker."""
    for process in psutil.Process(supervisor_pid).children(recursive=True):
        if is_engine_process(process):
            return process
    raise AssertionError("the worker has no engine process")


def _gone(process: psutil.Process, *, timeout: float) -> bool:
    try:
        process.wait(timeout)
    except psutil.TimeoutExpired:
        return process.status() == psutil.STATUS_ZOMBIE
    return True


@pytest.mark.faults
def test_f1b_engine_process_killed_mid_generation(make_world: Callable[..., FaultWorld]) -> None:
    world = make_world()
    world.api()
    key = world.create_key("f1b")
    supervisor = world.worker("f1b", supervised=True)
    world.wait_worker("f1b", supervisor)
    world.wait_broker_marker()
    ids, conversations = world.new_conversations(key, CONVERSATIONS, max_new_tokens=NEW_TOKENS)
    ids += world.more_turns(key, conversations, TURNS - 1, max_new_tokens=NEW_TOKENS)

    running = world.wait_running(4, timeout=60)
    engine = _engine_process(supervisor.pid)
    worker = engine.parent()
    assert worker is not None
    engine.kill()

    outcome, recovery_s = world.wait_terminal(ids, timeout=60)
    # The worker whose engine died has gone (its warm shutdown may still be ending); the
    # supervisor runs a new one.
    worker_gone = _gone(worker, timeout=20)
    report(
        "F1b",
        len(ids),
        outcome,
        recovery_s,
        running_at_kill=running,
        max_attempts=outcome.max_attempts,
        duplicate_events=outcome.duplicate_events,
        worker_restarted=worker_gone,
    )
    world.require(outcome.terminal == len(ids), f"all terminal within 60 s: {outcome}")
    world.require(outcome.succeeded == len(ids), f"all succeeded: {outcome}")
    # The turns in flight spend the attempt the engine died in, and no more: the dying worker
    # claims nothing after it (a claim there would fail at once, and spend another).
    world.require(outcome.max_attempts <= 2, f"one attempt lost at most: {outcome}")
    assert outcome.max_attempts == 2, "the kill fell between turns: none was generating"
    assert outcome.duplicate_replies == 0
    assert worker_gone, "the worker went on without its engine"
    assert supervisor.poll() is None
    new_engine = _engine_process(supervisor.pid)
    assert new_engine.pid != engine.pid
