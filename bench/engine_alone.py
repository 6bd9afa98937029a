"""The engine without the service: B2's and B3's conversations run straight on a worker's
Engine in this process (no HTTP, no database, no broker), to tell the engine's own speed from
the service's overhead.

Run: python -m bench.engine_alone [b2|b3]
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from typing import TypeVar

from app.schemas import ChatMessage
from bench.report import percentile, say
from bench.stack import model_dir
from worker.inference.engine import Engine, GenerationParams, StepStats
from worker.inference.loader import load_model
from worker.inference.prompt import build_prompt

SHAPES = {
    # name: (model size, conversations, turns, new tokens)
    "b2": ("tiny", 20, 20, 16),
    "b3": ("small", 16, 4, 32),
}


T = TypeVar("T")


def in_fresh_process(function: Callable[..., T], *args: object) -> T:
    """`function(*args)` in a process started for it (spawned: no model, thread or torch
    state of this one), for a baseline no earlier run in this process has slowed."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


@dataclass
class StepTotals:
    """Decoding steps: how many, their rows and their time (prefills are not steps)."""

    count: int = 0
    rows: int = 0
    seconds: float = 0.0

    def add(self, stats: StepStats) -> None:
        self.count += 1
        self.rows += stats.batch_size
        self.seconds += stats.seconds

    def __sub__(self, other: StepTotals) -> StepTotals:
        return StepTotals(
            self.count - other.count, self.rows - other.rows, self.seconds - other.seconds
        )

    def describe(self, wall_s: float) -> str:
        if not self.count:
            return "no decoding steps"
        return (
            f"{self.count / wall_s:.0f} steps/s of {self.rows / self.count:.1f} rows,"
            f" {1000 * self.seconds / self.count:.1f} ms each"
            f" ({self.seconds / wall_s:.0%} of the time stepping)"
        )


@dataclass(frozen=True)
class EngineRun:
    turns: int
    wall_s: float
    tokens: int
    latencies: list[float]
    cache_hits: int | None
    cache_misses: int | None
    cpu_s: float  # this process's CPU time over the run, all threads (torch's included)
    steps: StepTotals

    @property
    def turns_per_s(self) -> float:
        return self.turns / self.wall_s


def run_engine_alone(name: str) -> EngineRun:
    """Shape `name`'s conversations straight on an Engine in this process, each thread
    submitting its next turn as soon as the last one has ended."""
    size, conversations, turns, new_tokens = SHAPES[name]
    loaded = load_model(str(model_dir(size)))
    steps = StepTotals()
    engine = Engine.in_process(
        loaded, max_batch=16, prefix_cache_bytes=1024 * 2**20, on_step=steps.add
    )
    latencies: list[float] = []
    tokens = 0
    lock = threading.Lock()

    def converse(index: int) -> None:
        nonlocal tokens
        history: list[ChatMessage] = []
        for turn in range(turns):
            message = f"Conversation {index}, turn {turn}: tell me something new."
            prompt = build_prompt(
                loaded.tokenizer,
                system_prompt=None,
                history=history,
                message=message,
                max_context_tokens=loaded.max_context_tokens,
                max_new_tokens=new_tokens,
                last_turn=engine.last_turn(f"c{index}"),
            )
            started = time.perf_counter()
            result = engine.generate(
                prompt, GenerationParams(max_new_tokens=new_tokens), prefix_key=f"c{index}"
            )
            with lock:
                latencies.append(time.perf_counter() - started)
                tokens += result.completion_tokens
            history += [
                ChatMessage(role="user", content=message),
                ChatMessage(role="assistant", content=result.text),
            ]

    started, cpu_started = time.perf_counter(), time.process_time()
    threads = [threading.Thread(target=converse, args=(i,)) for i in range(conversations)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    cache = engine.prefix_cache
    return EngineRun(
        len(latencies),
        wall,
        tokens,
        latencies,
        None if cache is None else cache.hits,
        None if cache is None else cache.misses,
        cpu,
        steps,
    )


def main(argv: list[str]) -> None:
    name = argv[0] if argv else "b2"
    run = run_engine_alone(name)
    size = SHAPES[name][0]
    say(f"{name} on the engine alone ({size} model): {run.turns} turns in {run.wall_s:.1f} s")
    say(f"  {run.turns_per_s:.1f} turns/s, {run.tokens / run.wall_s:.1f} tokens/s")
    say(f"  turn latency p50 {percentile(run.latencies, 0.5) * 1000:.1f} ms")
    say(f"  {run.steps.describe(run.wall_s)}")
    say(f"  CPU {run.cpu_s / run.wall_s:.2f} cores, {1000 * run.cpu_s / run.turns:.2f} ms per turn")
    if run.cache_hits is not None:
        say(f"  prefix cache: {run.cache_hits} hits, {run.cache_misses} misses")


if __name__ == "__main__":
    main(sys.argv[1:])
