"""The engine alone beside other Python work: in its own process, or in another one.

A turn worker runs the engine's loop thread beside its Celery task threads (claims, finishes,
prompts, Redis), all under one interpreter lock. This measures what that costs the engine by
itself: B2's conversations on the engine alone (bench.engine_alone), first with nothing else
running, then beside threads doing pure Python work (as much CPU as B2's task threads use, by
default 0.6 of a core in short bursts) in the engine's own process, then beside the same work
in another process. Each run is a fresh process.

Run: python -m bench.engine_beside_work [--cores 0.6] [--threads 16]
"""

from __future__ import annotations

import argparse
import threading
import time
from multiprocessing import get_context
from multiprocessing.synchronize import Event as ProcessEvent

from bench.engine_alone import EngineRun, in_fresh_process, run_engine_alone
from bench.report import say

BURST_S = 0.002  # the work of one burst, as long as one claim's share of Python


def _burst() -> None:
    """Pure Python for BURST_S: the interpreter lock held, as an ORM or a client holds it."""
    until = time.perf_counter() + BURST_S
    while time.perf_counter() < until:
        sum(i * i for i in range(200))


def _work(
    threads: int, cores: float, stop: threading.Event | ProcessEvent
) -> list[threading.Thread]:
    """`threads` threads, together busy `cores` of a core, in bursts, until `stop`."""
    pause = BURST_S * threads / cores - BURST_S

    def run() -> None:
        while not stop.is_set():
            _burst()
            time.sleep(pause)

    started = [threading.Thread(target=run, daemon=True) for _ in range(threads)]
    for thread in started:
        thread.start()
    return started


def _engine_beside_own_threads(threads: int, cores: float) -> EngineRun:
    stop = threading.Event()
    workers = _work(threads, cores, stop)
    try:
        return run_engine_alone("b2")
    finally:
        stop.set()
        for thread in workers:
            thread.join()


def _work_in_process(threads: int, cores: float, stop: ProcessEvent) -> None:
    for thread in _work(threads, cores, stop):
        thread.join()


def _report(label: str, run: EngineRun, baseline: EngineRun | None) -> None:
    ratio = "" if baseline is None else f", {run.turns_per_s / baseline.turns_per_s:.0%} of alone"
    say(f"  {label}: {run.turns_per_s:.1f} turns/s{ratio}; {run.steps.describe(run.wall_s)}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.engine_beside_work")
    parser.add_argument("--cores", type=float, default=0.6)
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args()
    say(
        f"The engine alone (B2's conversations) beside {args.threads} threads of Python work,"
        f" {args.cores:.2f} of a core in {BURST_S * 1000:.0f} ms bursts"
    )
    alone = in_fresh_process(run_engine_alone, "b2")
    _report("nothing else", alone, None)
    beside = in_fresh_process(_engine_beside_own_threads, args.threads, args.cores)
    _report("the work in the engine's process", beside, alone)
    context = get_context("spawn")
    stop = context.Event()
    other = context.Process(target=_work_in_process, args=(args.threads, args.cores, stop))
    other.start()
    try:
        apart = in_fresh_process(run_engine_alone, "b2")
    finally:
        stop.set()
        other.join()
    _report("the work in another process", apart, alone)


if __name__ == "__main__":
    main()
