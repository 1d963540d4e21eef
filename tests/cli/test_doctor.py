"""`dslab doctor`: every row found by trying, exit 0 unless Redis is unusable."""

from __future__ import annotations

import json
import os

import pytest

from dslab.lab.doctor import check_netem, throwaway_namespace
from tests.helpers import run_dslab


def test_doctor_reports_every_item_and_exits_0(lab_env: dict[str, str]) -> None:
    """All the design's rows are there; optional gaps do not fail the command."""
    done = run_dslab("doctor", "--json", env=lab_env, check=True)
    document = json.loads(done.stdout)

    names = [check["name"] for check in document["checks"]]
    assert names == ["redis-server", "root", "network namespaces", "nftables",
                     "tc", "tc netem", "headless chromium"]
    assert document["usable"] is True
    for check in document["checks"]:
        assert check["ok"] or check["fix"], f"{check['name']} has no fix"


def test_doctor_exits_3_without_a_usable_redis(lab_env: dict[str, str]) -> None:
    """With DSLAB_REDIS_SERVER pointing nowhere, doctor says so and exits 3."""
    env = {**lab_env, "DSLAB_REDIS_SERVER": "/nonexistent/redis-server"}

    done = run_dslab("doctor", env=env)

    assert done.returncode == 3
    assert "No usable redis-server" in done.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="probing netem needs root")
def test_netem_probe_tells_the_truth_about_this_kernel() -> None:
    """The probe's answer matches what tc itself says in a fresh namespace; where
    the kernel lacks netem the reason names it and the fix offers the proxy."""
    with throwaway_namespace() as namespace:
        if namespace is None:
            pytest.skip("cannot create a network namespace here")
        check = check_netem(namespace)

    if check.ok:
        assert check.detail == "the kernel has sch_netem"
    else:
        assert "--backend proxy" in check.fix
        assert check.detail
