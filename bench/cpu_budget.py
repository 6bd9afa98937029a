"""Where a benchmark's CPU went: each part of the stack's CPU time over a run, as cores used
and as CPU milliseconds per unit of work (a submit, a turn).

On a 2-core machine the whole stack (API, worker, PostgreSQL, Redis and the benchmark's own
client) shares the cores, so the sum per unit of work bounds the rate: 2,000 ms of CPU a
second over the ms each unit costs. What is not any named part's (the OS, other processes)
is "other", from the machine's own total.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

import psutil

from bench.report import say


def _cpu_seconds(process: psutil.Process) -> float:
    try:
        times = process.cpu_times()
    except psutil.Error:  # gone since: its time is lost, the report says so as "other"
        return 0.0
    return float(times.user + times.system)


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def is_engine_process(process: psutil.Process) -> bool:
    """A turn worker's engine process (worker/inference/engine_process.py): spawned by
    multiprocessing, so its command line is multiprocessing's."""
    try:
        return "spawn_main" in " ".join(process.cmdline())
    except psutil.Error:
        return False


def _named(names: Iterable[str]) -> list[psutil.Process]:
    wanted = set(names)
    return [p for p in psutil.process_iter(["name"]) if p.info["name"] in wanted]


@dataclass
class CpuBudget:
    """`with CpuBudget.of_stack(api=..., worker=...) as budget:` the run, then
    `budget.report(units, "turn")`. The processes of each part are found when it starts (the
    stack is up by then)."""

    parts: dict[str, list[psutil.Process]]
    _start: dict[str, float] = field(default_factory=dict)
    _used: dict[str, float] = field(default_factory=dict)
    _began: float = 0.0
    _wall: float = 0.0

    @classmethod
    def of_stack(cls, *, api: int, worker: int | None = None) -> CpuBudget:
        """The API's processes (pid `api` and its children), the turn worker's (its engine
        process apart), PostgreSQL's and Redis's, and this process: the benchmark's client."""
        parts = {"API": _tree(api)}
        if worker is not None:
            processes = _tree(worker)
            parts["worker"] = [p for p in processes if not is_engine_process(p)]
            parts["engine"] = [p for p in processes if is_engine_process(p)]
        parts["PostgreSQL"] = _named(["postgres"])
        parts["Redis"] = _named(["redis-server"])
        parts["client"] = [psutil.Process()]
        return cls(parts)

    def _snapshot(self) -> dict[str, float]:
        taken = {name: sum(map(_cpu_seconds, procs)) for name, procs in self.parts.items()}
        times = psutil.cpu_times()
        taken["machine"] = float(times.user + times.system + getattr(times, "steal", 0.0))
        return taken

    def __enter__(self) -> Self:
        self._start = self._snapshot()
        self._began = time.monotonic()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        end = self._snapshot()
        self._wall = time.monotonic() - self._began
        self._used = {name: end[name] - self._start[name] for name in end}

    def report(self, units: int, unit: str) -> None:
        """Print each part's cores and CPU ms per `unit`, and the rate their sum allows."""
        machine = self._used["machine"]
        named = {name: used for name, used in self._used.items() if name != "machine"}
        named["other"] = max(0.0, machine - sum(named.values()))
        cores = psutil.cpu_count() or 1
        say(f"  CPU per {unit} over {self._wall:.1f} s ({units} {unit}s, {cores} cores):")
        for name, used in named.items():
            say(
                f"    {name:<11} {used / self._wall:4.2f} cores, "
                f"{1000 * used / max(units, 1):6.2f} ms per {unit}"
            )
        per_unit = machine / max(units, 1)
        say(
            f"    all        {machine / self._wall:4.2f} of {cores} cores, {1000 * per_unit:6.2f}"
            f" ms per {unit}: at most {cores / per_unit if per_unit else 0:.0f} {unit}s/s"
            " on this machine"
        )
