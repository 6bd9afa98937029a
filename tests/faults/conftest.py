"""Fault tests (docs reliability.md, F1-F15): each test owns its PostgreSQL and Redis, under
a temporary directory, so that it can stop, kill and start them; Parley runs as real `parley
api` and `parley worker` processes over them. Loopback only.

Run: .venv/bin/python -m pytest -q -s -p no:cacheprovider tests/faults
Each test prints its figures on one line starting with FAULT (shown with -s).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.faults.harness import FaultWorld


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "faults: fault scenarios over their own PostgreSQL, Redis and workers"
    )


@pytest.fixture
def make_world(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Callable[..., FaultWorld]]:
    """`make_world(**settings)`: a started world (servers migrated, no Parley process yet),
    with `settings` in its processes' environment; everything is stopped after the test."""
    worlds: list[FaultWorld] = []

    def make(**settings: str) -> FaultWorld:
        world = FaultWorld(tmp_path_factory.mktemp(request.node.name[:20]), **settings)
        worlds.append(world)
        world.start()
        return world

    yield make
    for world in worlds:
        world.close()
