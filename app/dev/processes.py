"""Process, lock and log helpers shared by the local PostgreSQL and Redis servers."""

from __future__ import annotations

import fcntl
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import NamedTuple, Self


class User(NamedTuple):
    uid: int
    gid: int


class DirLock:
    """An exclusive flock, so that two processes never run servers over one directory."""

    def __init__(self, path: Path) -> None:
        self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise RuntimeError(f"{path.parent} is in use by another process") from None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def run_logged(
    args: list[str], *, log_path: Path, run_as: User | None, cwd: Path, timeout: float
) -> None:
    # Output goes to a file, not a pipe: the postmaster pg_ctl spawns would otherwise keep the
    # pipe open and a read could block for the server's lifetime.
    with log_path.open("ab") as log:
        result = subprocess.run(
            args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=cwd, timeout=timeout,
            check=False,
            # Drop root's groups too, not only its uid: files made here belong to that user.
            user=None if run_as is None else run_as.uid,
            group=None if run_as is None else run_as.gid,
            extra_groups=None if run_as is None else [],
        )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"{Path(args[0]).name} failed ({result.returncode}):\n{tail(log_path)}")


def process_cmdline(pid: int) -> list[str] | None:
    """A live process's arguments; [] when it lives but /proc is absent; None when gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        if Path("/proc/self").exists():
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return []
    except OSError:
        return None
    if not raw:
        return None  # a zombie: it has exited, only its parent has not reaped it
    return [os.fsdecode(arg) for arg in raw.rstrip(b"\0").split(b"\0")]


def wait_gone(still_there: Callable[[], bool], *, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while still_there():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


class LocalServer:
    """What LocalPostgres and LocalRedis share: a context manager around start() and stop(),
    and the exit hook that stops the server in the process that started it."""

    _owner_pid: int | None

    def start(self) -> str:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _stop_at_exit(self) -> None:
        # A forked child (Celery prefork, uvicorn workers) inherits atexit hooks; only the
        # process that started the server may stop it.
        if os.getpid() == self._owner_pid:
            self.stop()
