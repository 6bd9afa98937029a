"""`parley worker`: one Celery worker process per GPU, each pinned with CUDA_VISIBLE_DEVICES
set before it starts (so before torch loads), or one CPU worker where there is no GPU.

This launcher never imports torch: it counts GPUs with nvidia-smi, so no CUDA context exists
in any process before the workers start (invariant 6). Each worker runs its model in an engine
process it spawns (worker/inference/engine_process.py), which inherits its pinning and ends
with it. Run: python -m worker.gpus --gpus auto
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from types import FrameType

from app.config import get_settings
from app.logs import configure_logging
from celeryconfig import TURNS_QUEUE

log = logging.getLogger("parley.gpus")


def detect_gpus() -> list[str]:
    """GPU indexes as nvidia-smi lists them; none when it is absent or fails."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip().isdigit()]


def plan(spec: str) -> list[str | None]:
    """`auto`: every GPU, or the CPU; `cpu`; or a list of GPU indexes such as `0,1`."""
    spec = spec.strip().lower()
    if spec == "cpu":
        return [None]
    if spec == "auto":
        return list(detect_gpus()) or [None]
    indexes = [part.strip() for part in spec.split(",") if part.strip()]
    if not indexes or not all(i.isdigit() for i in indexes):
        raise ValueError(f"--gpus takes auto, cpu or GPU indexes such as 0,1; not {spec!r}")
    return list(dict.fromkeys(indexes))


@dataclass
class WorkerSpec:
    gpu: str | None
    command: list[str]
    env: dict[str, str]


def worker_spec(gpu: str | None, *, gpu_count: int, name: str | None = None) -> WorkerSpec:
    """How to start the worker process for `gpu` (None: the CPU); `name` names it in Celery."""
    cores = os.cpu_count() or 1
    # A CPU worker may use every core; GPU workers share the cores so that they do not
    # oversubscribe them with torch's intra-op threads.
    threads = cores if gpu is None else max(1, cores // max(1, gpu_count))
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = "" if gpu is None else gpu
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env.setdefault("MKL_NUM_THREADS", str(threads))
    if gpu is None and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & env.keys():
        # A CPU worker shares its cores with the API, PostgreSQL and Redis. OpenMP threads
        # that spin for libgomp's default (about 3 ms) after each parallel region took a core's
        # share from them (B2 28-30 turns/s against 34); threads that sleep at once
        # (OMP_WAIT_POLICY=PASSIVE) are woken at each of a forward pass's hundreds of regions
        # (the engine alone on B3: 63-113 tokens/s against 130-144 with the default). A spin
        # of tens of microseconds spans the gaps inside a pass and sleeps between passes: in
        # alternating runs, B2 medians 33.5 turns/s against 34.5 sleeping, B3 109 tokens/s
        # against 95.
        env["GOMP_SPINCOUNT"] = "3000"
    name = name or ("parley-cpu" if gpu is None else f"parley-gpu{gpu}")
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.turn_worker.celery_app",
        "worker",
        "--pool",
        "threads",
        "--concurrency",
        # Each Celery thread waits on its turn's generation: twice as many threads as the batch
        # holds lets the next turns claim and build their prompts while the batch runs.
        str(2 * get_settings().worker_max_batch),
        "--queues",
        TURNS_QUEUE,
        "--hostname",
        f"{name}@%h",
        "--without-gossip",
        "--without-mingle",
        "--loglevel",
        os.environ.get("LOG_LEVEL", "INFO"),
    ]
    return WorkerSpec(gpu=gpu, command=command, env=env)


class Supervisor:
    """Runs the workers, restarts one that dies, and stops them all on SIGINT/SIGTERM."""

    def __init__(self, specs: list[WorkerSpec]) -> None:
        self.specs = specs
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * len(specs)
        self.stopping = False

    def _start(self, i: int) -> None:
        spec = self.specs[i]
        log.info("starting worker on %s", f"GPU {spec.gpu}" if spec.gpu is not None else "CPU")
        self.procs[i] = subprocess.Popen(spec.command, env=spec.env)

    def _signal(self, signum: int, _: FrameType | None) -> None:
        self.stopping = True
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def run(self) -> int:
        signal.signal(signal.SIGINT, self._signal)
        signal.signal(signal.SIGTERM, self._signal)
        for i in range(len(self.specs)):
            self._start(i)
        backoff = [1.0] * len(self.specs)
        while True:
            alive = [p is not None and p.poll() is None for p in self.procs]
            if self.stopping and not any(alive):
                return 0
            if not self.stopping:
                for i, ok in enumerate(alive):
                    if not ok:
                        log.warning("worker %d exited; restarting it", i)
                        time.sleep(backoff[i])
                        backoff[i] = min(backoff[i] * 2, 30.0)
                        self._start(i)
            time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="parley worker")
    parser.add_argument("--gpus", default="auto", help="auto, cpu, or GPU indexes such as 0,1")
    parser.add_argument(
        "--no-restart",
        action="store_true",
        help="run the one worker in this process's place, with no supervisor to restart it "
        "(for a process manager that restarts it itself)",
    )
    parser.add_argument("--name", help="the worker's name in Celery (one worker only)")
    args = parser.parse_args(argv)
    configure_logging()
    try:
        gpus = plan(args.gpus)
    except ValueError as exc:
        parser.error(str(exc))
    if (args.no_restart or args.name) and len(gpus) != 1:
        parser.error(f"--no-restart and --name run one worker; --gpus {args.gpus} is {len(gpus)}")
    specs = [worker_spec(gpu, gpu_count=len(gpus), name=args.name) for gpu in gpus]
    if args.no_restart:
        # The worker replaces this process: its signals and its exit are the caller's.
        os.execve(specs[0].command[0], specs[0].command, specs[0].env)  # noqa: S606
    return Supervisor(specs).run()


if __name__ == "__main__":
    raise SystemExit(main())
