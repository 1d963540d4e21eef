"""Timing the lab itself: how long a topology takes to be ready, and how long
a failover leaves the data without a primary.

Each run starts a fresh lab in a temporary folder, so runs do not disturb a
lab the user has running. Failover time is measured from the ``kill -9`` of
a primary to the moment the promoted replica says it is primary and (Cluster)
its cluster is ``ok`` again, or (Sentinel) a majority of Sentinels name it:
the moment a client could find a primary again.
"""

from __future__ import annotations

import os
import signal
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from dslab.errors import DslabError
from dslab.lab import probe
from dslab.lab.lab import Lab
from dslab.lab.topology import CLUSTER_NODE_TIMEOUT_MS, SENTINEL_DOWN_AFTER_MS
from dslab.settings import LabSettings, Topology

FAILOVER_TIMEOUT_S = 60.0
POLL_S = 0.01


@dataclass
class LabBenchResult:
    topology: str
    up_s: list[float] = field(default_factory=list)
    failover_s: list[float] = field(default_factory=list)
    baseline_up_s: list[float] = field(default_factory=list)  # standalone, same run
    detection_ms: int = 0  # the configured failure-detection timeout

    @staticmethod
    def summary(values: list[float]) -> dict[str, float]:
        if not values:
            return {}
        return {"min": min(values), "median": statistics.median(values),
                "max": max(values)}


def bench(
    topology: Topology,
    runs: int,
    settings: LabSettings,
    progress: Callable[[str], None] | None = None,
) -> LabBenchResult:
    """Time ``runs`` fresh labs of ``topology``: start-up, then one failover."""
    detection = (CLUSTER_NODE_TIMEOUT_MS if topology is Topology.CLUSTER
                 else SENTINEL_DOWN_AFTER_MS)
    result = LabBenchResult(topology.value, detection_ms=detection)
    for run in range(1, runs + 1):
        with tempfile.TemporaryDirectory(prefix="dslab-bench-") as folder:
            baseline = _settings_in(settings, Path(folder) / "baseline")
            with Lab(baseline) as lab:
                result.baseline_up_s.append(lab.up(Topology.STANDALONE).seconds)

            with Lab(_settings_in(settings, Path(folder) / "lab")) as lab:
                result.up_s.append(lab.up(topology).seconds)
                if topology is not Topology.STANDALONE:
                    result.failover_s.append(_failover(lab, topology))
        if progress is not None:
            progress(f"run {run}/{runs}: up {result.up_s[-1]:.2f} s"
                     + (f", failover {result.failover_s[-1]:.2f} s"
                        if result.failover_s else ""))
    return result


def _settings_in(settings: LabSettings, home: Path) -> LabSettings:
    return LabSettings(home=home, redis_server=settings.redis_server,
                       port_start=settings.port_start)


def _failover(lab: Lab, topology: Topology) -> float:
    victim = lab.node("redis-1")
    # Cluster: redis-4 replicates redis-1. Replicated: either replica may win.
    candidates = (["redis-4"] if topology is Topology.CLUSTER
                  else ["redis-2", "redis-3"])
    killed_at = time.monotonic()
    os.kill(victim.pid, signal.SIGKILL)

    while time.monotonic() - killed_at < FAILOVER_TIMEOUT_S:
        if topology is Topology.CLUSTER:
            done = _cluster_promoted(lab, candidates[0])
        else:
            done = _sentinel_promoted(lab, candidates)
        if done:
            return time.monotonic() - killed_at
        time.sleep(POLL_S)
    raise TimeoutError(f"no failover within {FAILOVER_TIMEOUT_S:.0f} s")


def _cluster_promoted(lab: Lab, name: str) -> bool:
    record = lab.node(name)
    try:
        with probe.connect(record.host, record.port) as client:
            role = client.info("replication").get("role")
            state = probe.cluster_info(client).get("cluster_state")
    except redis.RedisError:
        return False
    return role == "master" and state == "ok"


def _sentinel_promoted(lab: Lab, candidates: list[str]) -> bool:
    try:
        primary = lab.primary()
    except DslabError:  # no primary right now: the failover is still running
        return False
    if primary not in candidates:
        return False
    record = lab.node(primary)
    try:
        with probe.connect(record.host, record.port) as client:
            return client.info("replication").get("role") == "master"
    except redis.RedisError:
        return False
