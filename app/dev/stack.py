"""The one harness that runs Parley as real processes on this machine: `parley dev`, the
benchmarks (bench/) and the integration tests all start the service through it.

Each process is started exactly as its `parley` command starts it in production (`parley api`,
`parley worker`, `parley io-worker`, `parley beat`), so what the tests and the benchmarks
measure is what an operator runs. This module imports neither the worker nor the model stack:
the model is built, and the workers run, in child processes.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

ROOT = Path(__file__).resolve().parents[2]
Process = subprocess.Popen[bytes]


def ensure_model(directory: Path, *, size: str = "tiny") -> Path:
    """The local model of `size` in `directory`, built once from a fixed seed (no download)."""
    if not (directory / "config.json").exists():
        subprocess.run(
            [sys.executable, "-m", "app.cli", "model", "init", str(directory), "--size", size],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return directory.resolve()


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_http(
    url: str,
    *,
    timeout: float,
    procs: Sequence[Process] = (),
    stop: threading.Event | None = None,
) -> bool:
    """Poll `url` until it answers 200. False when `timeout` passes, one of `procs` exits or
    `stop` is set first."""
    stop = stop or threading.Event()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stop.is_set():
        if any(p.poll() is not None for p in procs):
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:  # noqa: S310 (our own URL)
                if answer.status == 200:
                    return True
        except OSError:
            pass
        stop.wait(0.3)
    return False


class Stack:
    """Parley's processes, with `env` over this process's environment (DATABASE_URL,
    REDIS_URL, MODEL_ID and any other setting). Leaving the `with` block, or `stop()`, ends
    every process it started: SIGTERM (a warm shutdown), then a kill for any that lingers."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self.env = {**os.environ, **(env or {})}
        self.procs: list[Process] = []
        self.base_url: str | None = None

    def start(
        self, argv: list[str], *, settings: Mapping[str, str] | None = None, log: Path | None = None
    ) -> Process:
        """Run `python -m <argv>` with the stack's environment plus `settings`; its output
        goes to this process's, or is appended to the file `log`."""
        env = {**self.env, **(settings or {})}
        command = [sys.executable, "-m", *argv]
        if log is None:
            proc = subprocess.Popen(command, env=env)
        else:
            with log.open("ab") as out:
                proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def api(
        self, *, host: str = "127.0.0.1", port: int | None = None, log: Path | None = None
    ) -> Process:
        """`parley api`; its address is `base_url`."""
        port = port or free_port()
        self.base_url = f"http://{host}:{port}"
        return self.start(["app.cli", "api", "--host", host, "--port", str(port)], log=log)

    def turn_worker(
        self,
        *,
        gpus: str = "auto",
        name: str | None = None,
        supervised: bool = False,
        log: Path | None = None,
        **settings: str,
    ) -> Process:
        """`parley worker`. With `name`: one worker so named, by default the worker itself
        with no supervisor to restart it (`--no-restart`), so that killing the returned
        process kills the worker; `supervised`: under the supervisor that restarts it, as in
        production."""
        argv = ["app.cli", "worker", "--gpus", gpus]
        if name is not None:
            argv += ["--name", name] if supervised else ["--no-restart", "--name", name]
        return self.start(argv, settings=settings, log=log)

    def io_worker(
        self, *, concurrency: int = 8, name: str = "parley-io", **settings: str
    ) -> Process:
        """`parley io-worker`: webhook deliveries and maintenance tasks."""
        argv = ["app.cli", "io-worker", "--concurrency", str(concurrency), "--name", name]
        return self.start(argv, settings=settings)

    def beat(self, data_dir: Path, **settings: str) -> Process:
        """`parley beat`, keeping its schedule's state in `data_dir`."""
        return self.start(["app.cli", "beat", "--data-dir", str(data_dir)], settings=settings)

    def wait_ready(
        self, path: str = "/readyz", *, timeout: float = 180, stop: threading.Event | None = None
    ) -> bool:
        """Wait until the API answers 200 on `path` (`/readyz`: the database, Redis and a
        worker are up); False when a process exits, `stop` is set or `timeout` passes."""
        if self.base_url is None:
            raise RuntimeError("the stack runs no API")
        return wait_http(self.base_url + path, timeout=timeout, procs=self.procs, stop=stop)

    def exited(self) -> bool:
        return any(p.poll() is not None for p in self.procs)

    def stop(self, procs: list[Process] | None = None, *, timeout: float = 20) -> None:
        """End `procs` (default: all the stack's), all at once, and wait for them."""
        procs = self.procs if procs is None else procs
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = [p for p in self.procs if p not in procs]

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
