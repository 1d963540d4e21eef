"""What a chaos command hits: a lab name or a role, resolved live.

Target strings:

- a name from the lab state: ``redis-1``, ``sentinel-2``, ``chat-1``...;
- ``primary``: the node that is primary *now* (asked of the Sentinels in a
  replicated lab, so after a failover it is the new one; ``redis-1`` when
  standalone; refused for a Cluster, which has one primary per slot range);
- ``replica``: the first replica by name; ``random-replica``: any replica;
- ``random:KIND``: one running process of that kind (``random:chat``);
- ``all:KIND``: every running process of that kind.

Random choices come from the ``random.Random`` the caller passes in and are
made over names in sorted order, so the same ``--seed`` against the same lab
picks the same target. An unknown target is a ``UsageError`` (exit 2) that
lists what would have worked.
"""

from __future__ import annotations

import random

from dslab.errors import UsageError
from dslab.lab.lab import Lab
from dslab.lab.state import LabState, ProcessRecord
from dslab.settings import Topology

ROLE_WORDS = ("primary", "replica", "random-replica")
KIND_PREFIXES = ("random:", "all:")


def options_text(state: LabState) -> str:
    """Every target string that works in this lab, for error messages."""
    names = [record.name for record in state.processes]
    kinds = sorted({record.kind for record in state.processes})
    words = [word for word in ROLE_WORDS
             if state.topology != Topology.STANDALONE or word == "primary"]
    if state.topology == Topology.CLUSTER:
        words.remove("primary")
    patterns = [f"{prefix}{kind}" for kind in kinds for prefix in KIND_PREFIXES]
    return ", ".join([*names, *words, *patterns])


def resolve(lab: Lab, target: str, rng: random.Random) -> list[ProcessRecord]:
    """The processes ``target`` names right now, at least one; see the module."""
    state = lab.require_state()
    text = target.strip()

    if text == "primary":
        return [state.find(_primary_name(lab, state))]
    if text in ("replica", "random-replica"):
        replicas = _replicas(lab, state)
        if text == "replica":
            return [replicas[0]]
        return [rng.choice(replicas)]
    for prefix in KIND_PREFIXES:
        if text.startswith(prefix):
            alive = _running_of_kind(state, text[len(prefix):])
            if prefix == "all:":
                return alive
            return [rng.choice(alive)]
    for record in state.processes:
        if record.name == text:
            return [record]

    raise UsageError(
        f"no target {target!r} in this {state.topology} lab",
        fix=f"use one of: {options_text(state)}",
    )


def _primary_name(lab: Lab, state: LabState) -> str:
    if state.topology == Topology.CLUSTER:
        primaries = [r.name for r in state.of_kind("redis")]
        raise UsageError(
            "`primary` is ambiguous in a Cluster: every shard has its own",
            fix=f"name a node instead (one of: {', '.join(primaries)}; "
            "`dslab lab status` shows which are primaries), or use "
            "random:redis",
        )
    return lab.primary()


def _replicas(lab: Lab, state: LabState) -> list[ProcessRecord]:
    """Live replicas by name; the role is asked of the nodes, not the file."""
    if state.topology == Topology.STANDALONE:
        raise UsageError(
            "a standalone lab has no replicas",
            fix="start one with `dslab lab up --topology replicated`, or use "
            f"one of: {options_text(state)}",
        )
    live = {node.name for node in lab.status().nodes
            if node.kind == "redis" and node.role == "replica"}
    replicas = sorted((r for r in state.of_kind("redis") if r.name in live),
                      key=lambda record: record.name)
    if not replicas:
        raise UsageError(
            "no node answers as a replica right now",
            fix="see `dslab lab status`; bring nodes back with `dslab lab up`",
        )
    return replicas


def _running_of_kind(state: LabState, kind: str) -> list[ProcessRecord]:
    of_kind = state.of_kind(kind)
    if not of_kind:
        kinds = ", ".join(sorted({r.kind for r in state.processes}))
        raise UsageError(
            f"the lab has no process of kind {kind!r}",
            fix=f"use a kind that exists ({kinds})",
        )
    alive = sorted((r for r in of_kind if r.is_alive()), key=lambda r: r.name)
    if not alive:
        raise UsageError(
            f"no {kind} process is running: all {len(of_kind)} are dead",
            fix="bring them back with `dslab lab up` or `dslab chaos restart NAME`",
        )
    return alive
