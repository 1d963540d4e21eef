"""Fixtures that start real Redis labs through dslab's own ``Lab`` and always
tear them down, whatever the test did to them."""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dslab.chaos.heal import heal_all
from dslab.lab.lab import Lab
from dslab.redisconn import async_client
from dslab.settings import LabSettings, Persistence, RedisTarget, Topology

# Each test process searches for free ports in its own region, so parallel
# runs on one machine do not race for the same block: pytest-xdist workers
# (gw0, gw1, ...) get disjoint 5,000-port regions for nodes (their Cluster bus
# ports, +10,000, stay clear of them too) and for services.
# Four regions fit below port 65535 with the bus offset; more workers share.
WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")) % 4
PORT_START = (20000 + WORKER * 5000
              + random.Random(os.getpid()).randrange(0, 40) * 100)
os.environ["DSLAB_SERVICE_PORT_START"] = str(50000 + WORKER * 3000)


@pytest.fixture
def lab_settings(tmp_path: Path) -> LabSettings:
    """Settings for a lab living in this test's own temporary folder."""
    return LabSettings.build(
        home=tmp_path / "lab", environ={"DSLAB_PORT_START": str(PORT_START)}
    )


@pytest.fixture
def lab_env(lab_settings: LabSettings) -> dict[str, str]:
    """Environment for running the `dslab` command against this test's lab."""
    env = dict(os.environ)
    env["DSLAB_HOME"] = str(lab_settings.home)
    env["DSLAB_PORT_START"] = str(PORT_START)
    env.pop("DSLAB_REDIS_SERVER", None)
    env["COLUMNS"] = "200"
    env["NO_COLOR"] = "1"
    return env


StartLab = Callable[..., Lab]


def _heal_faults(home: Path) -> list[str]:
    return [result.fault.describe() for result in heal_all(home)]


@pytest.fixture
def start_lab(lab_settings: LabSettings) -> Iterator[StartLab]:
    """Factory: start a topology in this test's folder; downed after the test."""
    labs: list[Lab] = []

    def start(
        topology: Topology = Topology.STANDALONE,
        persistence: Persistence = Persistence.EVERYSEC,
        **options: object,
    ) -> Lab:
        lab = Lab(lab_settings, heal_faults=_heal_faults)
        labs.append(lab)
        lab.up(topology, persistence, **options)  # type: ignore[arg-type]
        return lab

    try:
        yield start
    finally:
        for lab in labs:
            lab.down(force=True)


@pytest.fixture
def redis_target(start_lab: StartLab) -> RedisTarget:
    """A standalone lab Redis for this test."""
    return start_lab().redis_target()


@pytest.fixture
async def redis_client(redis_target: RedisTarget) -> AsyncIterator[Any]:
    """An asyncio client on the test's Redis, closed afterwards."""
    client = async_client(redis_target)
    try:
        yield client
    finally:
        await client.aclose()
