"""The local Redis lab: start a topology, watch it, break it, tear it down.

``Lab`` is the one way dslab starts Redis: the CLI, the tests and later the
chat and shortener commands all go through it. Used as a context manager it
guarantees ``down`` on exit::

    with Lab(LabSettings.build(home=tmp)) as lab:
        lab.up(Topology.CLUSTER)
        print(lab.redis_target())

Guarantees:

- ``up`` is idempotent and either returns a ready lab or leaves nothing
  running (also on Ctrl-C): every process is written to ``state.json`` as
  soon as it is spawned, so even a ``kill -9`` of dslab mid-``up`` leaves a
  state that ``down`` can clean;
- ``down`` stops every process the lab started, including ones found only by
  their command line when the state file was lost, and removes the state;
- with ``network=Network.NETNS`` (root, Linux) every node runs in its own
  network namespace on a private bridge (see ``dslab.lab.netns``), and
  ``down`` removes namespaces, veths and bridge after stopping the processes,
  also leftovers found by the lab's name tag. The default loopback lab never
  touches the network;
- with ``network=Network.PROXY`` (no privileges) every node binds its own
  127.0.0.x address and a lab fault proxy (``proxy-redis-1``; for Cluster
  also ``proxy-redis-1-bus``) on 127.0.0.1 stands in front of it. Nodes
  announce their proxies and reach each other only through them, and
  ``redis_target`` names the proxies, so clients, services, replication,
  Sentinel and the Cluster bus all pass a proxy that can cut or slow them
  (see ``dslab.lab.topology``). Proxies start before the nodes and stop
  after them. The lab's own probes (``status``, readiness) go to the nodes'
  own addresses, so they see the nodes even while a proxy cuts them off.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import psutil
import redis

from dslab.errors import (
    LabAlreadyRunning,
    LabNotRunning,
    LabStateCorrupt,
    UsageError,
)
from dslab.lab import cluster, netns, probe, topology
from dslab.lab.netns import LabNetwork, Network
from dslab.lab.redis_binary import RedisBinary, find_redis_server
from dslab.lab.state import LabState, ProcessRecord, locked, read_state, write_state
from dslab.lab.supervisor import (
    find_free_block,
    kill_processes,
    os_free_ports,
    processes_using,
    require_free,
    spawn_detached,
    stop_processes,
    wait_until,
)
from dslab.settings import (
    LOOPBACK_HOST,
    SENTINEL_SERVICE,
    LabSettings,
    Persistence,
    RedisKind,
    RedisTarget,
    Topology,
)

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 30.0
# The fault proxy entry point; run as a process, so the lab imports nothing
# of the chaos layer.
PROXY_MODULE = "dslab.chaos.proxy"


@dataclass
class UpResult:
    state: LabState
    binary: RedisBinary | None  # None when the lab was already running
    started: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def already_running(self) -> bool:
        return self.binary is None and not self.started


@dataclass
class DownResult:
    stopped: list[str]  # names that were alive and were stopped
    already_dead: list[str]
    strays: list[int]  # pids found by their marker, not in the state
    removed_data: bool
    healed: list[str] = field(default_factory=list)  # faults undone first
    # Namespaces and links of a `--network netns` lab that were deleted.
    network_removed: list[str] = field(default_factory=list)


@dataclass
class LabStatus:
    state: LabState
    nodes: list[probe.NodeHealth]
    primary: str | None  # the current primary's name, where there is one

    @property
    def healthy(self) -> bool:
        return all(node.healthy for node in self.nodes)


def process_condition(record: ProcessRecord) -> str:
    """``running``, ``paused`` (SIGSTOP) or ``dead``, from the OS, not the file."""
    if not record.is_alive():
        return "dead"
    try:
        if psutil.Process(record.pid).status() == psutil.STATUS_STOPPED:
            return "paused"
    except psutil.Error:
        return "dead"
    return "running"


class Lab:
    def __init__(
        self,
        settings: LabSettings,
        *,
        heal_faults: Callable[[Path], list[str]] | None = None,
    ) -> None:
        """``heal_faults(home)`` runs first in ``down`` and says what it healed:
        the chaos layer passes its journal's heal here (the lab itself knows
        nothing of faults)."""
        self.settings = settings
        self.home = settings.home
        self.heal_faults = heal_faults

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.down()

    # -- reading -----------------------------------------------------------

    def state(self) -> LabState | None:
        return read_state(self.settings.state_file)

    def require_state(self) -> LabState:
        state = self.state()
        if state is None:
            raise LabNotRunning(
                f"no lab is running in {self.home}",
                fix="start one with `dslab lab up` (or set DSLAB_HOME to the "
                "folder of the lab you mean)",
            )
        return state

    def status(self) -> LabStatus:
        state = self.require_state()
        nodes = [
            probe.inspect_node(record, process_condition(record))
            for record in state.processes
        ]
        return LabStatus(state, nodes, self._primary_name(state, nodes))

    def node(self, name: str) -> ProcessRecord:
        return self.require_state().find(name)

    def network(self) -> LabNetwork | None:
        """The lab's private LAN when it runs with ``--network netns``."""
        state = self.require_state()
        if network_mode(state) is not Network.NETNS:
            return None
        assert state.network is not None
        return LabNetwork.from_json(state.network)

    def network_mode(self) -> Network:
        return network_mode(self.require_state())

    def lab_proxies(self, name: str) -> list[ProcessRecord]:
        """The lab fault proxies in front of node ``name`` (``--network
        proxy``): its client proxy, then its bus proxy if it has one."""
        return [record for record in self.require_state().processes
                if is_lab_proxy(record) and record.extra.get("in_front_of") == name]

    def redis_target(self) -> RedisTarget:
        """The URL a client uses to reach this lab, as ``--redis`` would take it.

        With ``--network proxy`` it names the nodes' proxies, never the nodes.
        """
        state = self.require_state()
        reached = _reached_at(state)

        def addresses(records: list[ProcessRecord]) -> tuple[tuple[str, int], ...]:
            return tuple(reached.get(node.name, (node.host, node.port))
                         for node in records)

        redis_nodes = state.of_kind("redis")
        if state.topology == Topology.REPLICATED:
            return RedisTarget(RedisKind.SENTINEL, addresses(state.of_kind("sentinel")),
                               service=SENTINEL_SERVICE)
        if state.topology == Topology.CLUSTER:
            return RedisTarget(RedisKind.CLUSTER, addresses(redis_nodes))
        return RedisTarget(RedisKind.STANDALONE, addresses(redis_nodes[:1]))

    def primary(self) -> str:
        """The name of the node that is primary right now (asked live)."""
        state = self.require_state()
        if state.topology == Topology.CLUSTER:
            raise UsageError(
                "a Cluster has one primary per slot range, not one primary",
                fix="see the primaries in `dslab lab status`",
            )
        found = self._primary_name(state, None)
        if found is None:
            raise LabNotRunning(
                "no node is primary right now (a failover may be in progress)",
                fix="wait a few seconds and ask again; `dslab lab status` shows "
                "every node",
            )
        return found

    # -- changing ----------------------------------------------------------

    def up(
        self,
        topology_name: Topology = Topology.STANDALONE,
        persistence: Persistence = Persistence.EVERYSEC,
        *,
        base_port: int | None = None,
        extra_config: list[str] | None = None,
        timeout_s: float = READY_TIMEOUT_S,
        network: Network = Network.LOOPBACK,
    ) -> UpResult:
        """Start ``topology_name`` and wait until it serves; see module docstring."""
        if network is Network.NETNS:
            netns.require_support()
        with locked(self.home):
            existing = self._reusable_state(topology_name, persistence, network)
            if existing is not None:
                return self._revive(existing, timeout_s)

            began = time.monotonic()
            binary = find_redis_server(self.settings.redis_server)
            lab_network = None
            proxies: list[topology.ProxyPlan] = []
            network_json: dict[str, object] | None = None
            if network is Network.PROXY:
                base_port = self._free_ports(topology_name, base_port)
                names = [plan.name for plan in
                         topology.plan(topology_name, persistence, base_port)]
                node_addresses = topology.proxy_addresses(names)
                plans = topology.plan(topology_name, persistence, base_port,
                                      extra_config, node_addresses, proxied=True)
                proxies = topology.proxy_plans(plans, node_addresses)
                for proxy in proxies:
                    require_free([proxy.upstream[1]], host=proxy.upstream[0])
                network_json = {"mode": Network.PROXY.value,
                                "addresses": node_addresses}
            elif network is Network.NETNS:
                # Each node has an address of its own, so ports cannot clash
                # and the host's loopback ports do not matter.
                base_port = base_port or self.settings.port_start
                names = [plan.name for plan in
                         topology.plan(topology_name, persistence, base_port)]
                lab_network = netns.plan_network(self.home, names)
                plans = topology.plan(topology_name, persistence, base_port,
                                      extra_config, lab_network.addresses())
                network_json = lab_network.to_json()
            else:
                base_port = self._free_ports(topology_name, base_port)
                plans = topology.plan(topology_name, persistence, base_port,
                                      extra_config)
            state = LabState(
                topology=topology_name.value,
                persistence=persistence.value,
                redis_server=binary.as_dict(),
                created_at=time.time(),
                network=network_json,
            )
            with self._cleanup_on_failure(state):
                if lab_network is not None:
                    self._build_network(lab_network, state)
                # Proxies first: a node's first connection to another already
                # goes through the other's proxy.
                self._start_proxies(proxies, state, timeout_s)
                self._start_nodes(plans, state, binary, timeout_s, lab_network)
                if topology_name is Topology.CLUSTER:
                    by_name = {record.name: record
                               for record in state.of_kind("redis")}
                    cluster.create_cluster(plans, by_name, timeout_s=timeout_s,
                                           meet_at=_reached_at(state))
                if topology_name is Topology.REPLICATED:
                    self._wait_sentinels(state, timeout_s)

            seconds = time.monotonic() - began
            log.info("lab up: %s with %d nodes in %.2f s", topology_name.value,
                     len(plans), seconds)
            return UpResult(state, binary, [plan.name for plan in plans], seconds)

    def down(self, *, force: bool = False, keep_data: bool = False) -> DownResult:
        """Heal every fault, stop everything the lab started and forget it;
        safe to repeat."""
        healed = self.heal_faults(self.home) if self.heal_faults else []
        with locked(self.home):
            try:
                state = self.state()
            except LabStateCorrupt:
                if not force:
                    raise
                state = None

            records = state.processes if state else []
            # Services first, while Redis still answers their goodbyes (a chat
            # server removes its users' presence) through the lab proxies;
            # then the nodes; the lab proxies last.
            lab_proxies = [r for r in records if is_lab_proxy(r)]
            services = [r for r in records
                        if r.kind not in probe.REDIS_KINDS and not is_lab_proxy(r)]
            nodes = [r for r in records if r.kind in probe.REDIS_KINDS]
            stopped = (stop_processes(services) + stop_processes(nodes)
                       + stop_processes(lab_proxies))
            already_dead = [r.name for r in records if r.name not in stopped]

            strays = processes_using(self.home)
            kill_processes(strays)
            # After the processes: a namespace lives as long as one runs in it.
            network_removed = self._remove_network(state)

            self.settings.state_file.unlink(missing_ok=True)
            if not keep_data:
                for record in records:
                    shutil.rmtree(record.dir, ignore_errors=True)
            for name in stopped:
                log.info("node stopped: %s", name)

            return DownResult(stopped, already_dead, [p.pid for p in strays],
                              removed_data=not keep_data, healed=healed,
                              network_removed=network_removed)

    def restart(
        self, name: str, *, timeout_s: float = READY_TIMEOUT_S
    ) -> ProcessRecord:
        """Start ``name`` again from its own folder, so it comes back with its data."""
        with locked(self.home):
            state = self.require_state()
            old = state.find(name)
            stop_processes([old])
            record = self._respawn(old)
            state.replace(record)
            write_state(self.settings.state_file, state)
            wait_until(record, functools.partial(probe.ready_check, record),
                       timeout_s=timeout_s, what="restarting")
            log.info("node restarted: %s pid=%d port=%d", name, record.pid,
                     record.port)
            return record

    def launch(
        self,
        name: str,
        kind: str,
        argv: list[str],
        *,
        port: int,
        role: str | None = None,
        extra: dict[str, object] | None = None,
        timeout_s: float = READY_TIMEOUT_S,
        workdir: Path | None = None,
    ) -> ProcessRecord:
        """Run a service (a chat server, a shortener, a fault proxy) as part of
        the lab: detached, recorded in the state, stopped by ``down``.

        It runs in its own folder of the lab (its log is there too), or in
        ``workdir`` when given: a learner's command such as ``./my-server``
        means the folder it was typed in. A restart keeps that choice.

        Ready when its ``extra["health_url"]`` answers 200 (or, without one,
        when its port accepts connections). A service that fails to start is
        stopped and forgotten, and the error carries the end of its log.
        """
        with locked(self.home):
            state = self.require_state()
            if any(r.name == name and r.is_alive() for r in state.processes):
                raise UsageError(
                    f"{name} is already running in the lab",
                    fix=f"stop it first (`dslab lab down`), or restart it with "
                    f"`dslab lab restart {name}`",
                )
            folder = self.home / name
            folder.mkdir(parents=True, exist_ok=True)
            record = self._spawn(name, kind, role or kind, argv, folder,
                                 folder / f"{kind}.log", port, workdir=workdir)
            record.extra = dict(extra or {})
            if workdir is not None:
                record.extra["workdir"] = str(workdir)
            state.processes = [r for r in state.processes if r.name != name]
            state.processes.append(record)
            write_state(self.settings.state_file, state)
            try:
                wait_until(record, functools.partial(probe.ready_check, record),
                           timeout_s=timeout_s, what="starting up")
            except BaseException:
                with _sigint_ignored():
                    stop_processes([record])
                    state.processes.remove(record)
                    write_state(self.settings.state_file, state)
                raise
            log.info("service started: %s pid=%d port=%d", name, record.pid, port)
            return record

    def next_name(self, kind: str) -> str:
        """The first free ``kind-N`` name (``chat-1``, ``chat-2``...)."""
        taken = {record.name for record in self.require_state().processes}
        index = 1
        while f"{kind}-{index}" in taken:
            index += 1
        return f"{kind}-{index}"

    def log_path(self, name: str) -> Path:
        return Path(self.node(name).log)

    # -- internals ---------------------------------------------------------

    def _free_ports(self, topology_name: Topology, base_port: int | None) -> int:
        """The base port of a loopback lab, every port it needs checked free."""
        bus = (topology.CLUSTER_BUS_OFFSET if topology_name is Topology.CLUSTER
               else None)
        count = topology.node_count(topology_name)
        if base_port is None:
            base_port = find_free_block(
                count, start=self.settings.port_start,
                stop=self.settings.port_start + 2900, bus_offset=bus,
            )
        ports = list(range(base_port, base_port + count))
        require_free(ports + [port + bus for port in ports] if bus else ports)
        return base_port

    def _build_network(self, lab_network: LabNetwork, state: LabState) -> None:
        # Recorded before anything exists, so a dslab killed while building
        # leaves a state that `down` can clean.
        write_state(self.settings.state_file, state)
        if netns.leftovers(lab_network.tag):
            # A lab in this folder was abandoned without `down`; its processes
            # are gone (there is no live state), so its network is stale.
            log.info("stale lab network found: removing it")
            netns.teardown(lab_network.tag)
        netns.create(lab_network)

    def _remove_network(self, state: LabState | None) -> list[str]:
        """Tear down the lab's namespaces and links, if it ever had any."""
        tag = netns.lab_tag(self.home)
        if ((state is None or network_mode(state) is not Network.NETNS)
                and not netns.leftovers(tag)):
            return []
        return netns.teardown(tag)

    def _reusable_state(
        self, topology_name: Topology, persistence: Persistence,
        network: Network = Network.LOOPBACK,
    ) -> LabState | None:
        state = self.state()
        if state is None:
            return None
        if not any(record.is_alive() for record in state.processes):
            log.info("stale lab state found, every process is dead: cleaning up")
            self._forget(state)
            return None
        running_network = network_mode(state)
        if (state.topology != topology_name or state.persistence != persistence
                or running_network is not network):
            raise LabAlreadyRunning(
                f"a {state.topology} lab (persistence {state.persistence}, "
                f"network {running_network.value}) is already running in "
                f"{self.home}",
                fix="stop it with `dslab lab down` first, or start a second lab "
                "in another folder with DSLAB_HOME=/some/other/dir",
            )
        return state

    def _forget(self, state: LabState) -> None:
        """Stop a lab that is being abandoned, including any process that was
        spawned but not yet recorded when ``up`` was interrupted."""
        stop_processes(state.processes)
        kill_processes(processes_using(self.home))
        self._remove_network(state)
        self.settings.state_file.unlink(missing_ok=True)
        for record in state.processes:
            shutil.rmtree(record.dir, ignore_errors=True)

    def _revive(self, state: LabState, timeout_s: float) -> UpResult:
        """A matching lab runs already: bring back any node that died."""
        revived = []
        for record in state.processes:
            if not record.is_alive():
                fresh = self._respawn(record)
                state.replace(fresh)
                write_state(self.settings.state_file, state)
                wait_until(fresh, functools.partial(probe.ready_check, fresh),
                           timeout_s=timeout_s, what="restarting")
                revived.append(record.name)
        return UpResult(state, None, revived)

    def _start_proxies(
        self, proxies: list[topology.ProxyPlan], state: LabState, timeout_s: float,
    ) -> None:
        """Start the lab's fault proxies (``--network proxy``), each recorded
        as soon as it is spawned, and wait until every one answers."""
        started = []
        for plan, control_port in zip(proxies, os_free_ports(len(proxies)),
                                      strict=True):
            folder = self.home / plan.name
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            control_url = f"http://{LOOPBACK_HOST}:{control_port}"
            upstream = f"{plan.upstream[0]}:{plan.upstream[1]}"
            argv = [sys.executable, "-m", PROXY_MODULE,
                    "--listen", f"{LOOPBACK_HOST}:{plan.port}",
                    "--upstream", upstream,
                    "--control", f"{LOOPBACK_HOST}:{control_port}"]
            record = self._spawn(plan.name, topology.PROXY_KIND, topology.PROXY_KIND,
                                 argv, folder, folder / "proxy.log", plan.port)
            record.extra = {"health_url": f"{control_url}/faults",
                            "control_url": control_url, "in_front_of": plan.node,
                            "upstream": upstream, "path": plan.path,
                            "lab_managed": True}
            state.processes.append(record)
            write_state(self.settings.state_file, state)
            started.append(record)

        for record in started:
            wait_until(record, functools.partial(probe.ready_check, record),
                       timeout_s=timeout_s, what="starting up")

    def _start_nodes(
        self, plans: list[topology.NodePlan], state: LabState, binary: RedisBinary,
        timeout_s: float, lab_network: LabNetwork | None = None,
    ) -> None:
        started = []
        for plan in plans:
            node_dir = self.home / plan.name
            shutil.rmtree(node_dir, ignore_errors=True)
            node_dir.mkdir(parents=True)
            config_file = node_dir / f"{plan.kind}.conf"
            config_file.write_text(
                "\n".join([*plan.config, f"dir {node_dir}"]) + "\n", encoding="utf-8"
            )
            argv = [str(binary.path), str(config_file)]
            if plan.kind == "sentinel":
                argv.append("--sentinel")
            link = None if lab_network is None else lab_network.node(plan.name)
            host = _own_address(state, plan.name)
            if link is not None:
                argv = netns.exec_prefix(link.namespace) + argv
                host = link.address
            record = self._spawn(plan.name, plan.kind, plan.role, argv, node_dir,
                                 node_dir / f"{plan.kind}.log", plan.port, host=host)
            if link is not None:
                record.extra["namespace"] = link.namespace
            state.processes.append(record)
            # Written after every spawn: a dslab killed now leaves a cleanable lab.
            write_state(self.settings.state_file, state)
            started.append(record)

        for plan, record in zip(plans, started, strict=True):
            ready = _readiness(plan, record)
            wait_until(record, ready, timeout_s=timeout_s, what="starting up")
            log.info("node ready: %s pid=%d port=%d", record.name, record.pid,
                     record.port)

    def _respawn(self, old: ProcessRecord) -> ProcessRecord:
        workdir = old.extra.get("workdir")
        fresh = self._spawn(old.name, old.kind, old.role, old.argv, Path(old.dir),
                            Path(old.log), old.port, host=old.host,
                            workdir=Path(str(workdir)) if workdir else None)
        fresh.extra = old.extra
        return fresh

    def _spawn(
        self, name: str, kind: str, role: str, argv: list[str], node_dir: Path,
        log_file: Path, port: int, *, host: str = LOOPBACK_HOST,
        workdir: Path | None = None,
    ) -> ProcessRecord:
        spawned = spawn_detached(
            argv, log_path=log_file, cwd=workdir or node_dir, lab_home=self.home
        )
        log.info("node started: %s pid=%d port=%d", name, spawned.pid, port)
        return ProcessRecord(
            name=name, kind=kind, role=role, pid=spawned.pid,
            started_at=spawned.started_at, host=host, port=port,
            dir=str(node_dir), log=str(log_file), argv=argv,
        )

    def _wait_sentinels(self, state: LabState, timeout_s: float) -> None:
        """Sentinels find each other through the primary's hello channel (~2 s);
        until they do, they could not agree on a failover."""
        sentinels = state.of_kind("sentinel")
        replicas = len(state.of_kind("redis")) - 1

        def knows_everyone(record: ProcessRecord) -> bool:
            try:
                with probe.connect(record.host, record.port) as client:
                    primary = probe.sentinel_primary(client)
            except redis.RedisError:
                return False
            return (
                int(primary.get("num-other-sentinels", 0)) == len(sentinels) - 1
                and int(primary.get("num-slaves", 0)) == replicas
            )

        for record in sentinels:
            wait_until(record, functools.partial(knows_everyone, record),
                       timeout_s=timeout_s, what="discovering the other Sentinels")

    @contextlib.contextmanager
    def _cleanup_on_failure(self, state: LabState) -> Iterator[None]:
        """Leave nothing half-started behind, whatever stops ``up``."""
        try:
            yield
        except BaseException as exc:
            with _sigint_ignored():
                log.warning("lab up failed (%s): stopping %d started nodes",
                            type(exc).__name__, len(state.processes))
                self._forget(state)
            raise

    def _primary_name(
        self, state: LabState, nodes: list[probe.NodeHealth] | None
    ) -> str | None:
        if state.topology == Topology.STANDALONE:
            return state.processes[0].name if state.processes else None
        if state.topology == Topology.CLUSTER:
            return None
        by_address = {record.address: record.name for record in state.of_kind("redis")}
        # Behind proxies, Sentinels know a node by its proxy's address.
        by_address.update({f"{host}:{port}": name
                           for name, (host, port) in _reached_at(state).items()})
        # Sentinels decide who is primary; ask them, take the majority view.
        votes: dict[str, int] = {}
        for record in state.of_kind("sentinel"):
            if not record.is_alive():
                continue
            try:
                with probe.connect(record.host, record.port) as client:
                    address = probe.sentinel_primary_address(client)
            except redis.RedisError:
                continue
            if address is not None:
                votes[address] = votes.get(address, 0) + 1
        if votes:
            address = max(votes, key=lambda key: votes[key])
            return by_address.get(address)
        # No Sentinel answers: fall back to what the nodes say of themselves.
        for node in nodes or []:
            if node.role == "primary":
                return node.name
        return None


def network_mode(state: LabState) -> Network:
    """How the lab in ``state`` is wired; labs without the field are loopback
    and a network without a mode is a netns LAN (written before there were
    others)."""
    if state.network is None:
        return Network.LOOPBACK
    return Network(str(state.network.get("mode", Network.NETNS.value)))


def is_lab_proxy(record: ProcessRecord) -> bool:
    """A fault proxy the lab itself put in front of a node (``--network
    proxy``), as opposed to one started on demand by ``chaos delay``."""
    return record.kind == topology.PROXY_KIND and bool(record.extra.get("lab_managed"))


def _reached_at(state: LabState) -> dict[str, tuple[str, int]]:
    """Node name -> the client proxy others reach it at (``--network proxy``);
    empty for other labs."""
    return {str(record.extra["in_front_of"]): (record.host, record.port)
            for record in state.processes
            if is_lab_proxy(record)
            and record.extra.get("path") == topology.CLIENT_PATH}


def _own_address(state: LabState, name: str) -> str:
    """The address node ``name`` binds in a ``--network proxy`` lab, else
    127.0.0.1 (a netns node's address comes from its link)."""
    if network_mode(state) is not Network.PROXY or state.network is None:
        return LOOPBACK_HOST
    return str(state.network.get("addresses", {}).get(name, LOOPBACK_HOST))


def _readiness(plan: topology.NodePlan, record: ProcessRecord) -> Callable[[], bool]:
    if any(line.startswith("replicaof ") for line in plan.config):
        # A replica started with `replicaof` is ready once it has synced.
        def synced() -> bool:
            try:
                with probe.connect(record.host, record.port) as client:
                    info = client.info("replication")
            except redis.RedisError:
                return False
            return info.get("master_link_status") == "up"

        return synced
    return lambda: probe.answers(record)


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """A second Ctrl-C must not interrupt the cleanup of the first."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)

