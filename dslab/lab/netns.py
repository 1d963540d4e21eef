"""Lab nodes as small hosts on a private LAN: namespaces, veth pairs, a bridge.

With ``lab up --network netns`` every Redis node and Sentinel runs in its own
network namespace. Each namespace has one interface, ``eth0``, the inner end
of a veth pair whose outer end is a port of one bridge in the host namespace.
The bridge holds the gateway address (``.1``), so programs on the host reach
the nodes directly; nodes get ``.11``, ``.12``, ... in plan order. Nodes have
no default route: nothing they send can leave the bridge.

Everything is made with ``ip`` and named after the lab, so it can be found
again without any state file:

- namespaces ``dslab-<tag>-<node>`` (``dslab-3fa2c1-redis-1``),
- the bridge ``dsbr-<tag>`` and the host ends ``dsv-<tag>-<n>``,

where ``tag`` is derived from the lab's folder. Guarantees:

- the /24 is taken from 10.213.0.0/16 and overlaps no route the machine
  has when the lab starts; no address outside it is ever configured;
- ``teardown`` is idempotent and removes every namespace and link carrying
  the lab's tag, also leftovers of a dslab that was killed mid-``up``;
- ``delete_table`` removes one nftables table inside a namespace and treats
  "already gone" (table or whole namespace) as done, so undo can repeat.

Attention: all of this needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) on Linux.
On hosts whose bridged traffic passes through a firewall with a DROP policy
(``br_netfilter`` with Docker's FORWARD chain), nodes cannot talk to each other
and ``lab up`` times out waiting for replication.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from dslab.errors import EnvironmentProblem

log = logging.getLogger(__name__)

# Private space (RFC 1918) rarely used by VPNs or container runtimes, which
# favour 10.0/16, 10.8/16, 172.17/16 and 192.168/16.
SUBNET_POOL = ipaddress.IPv4Network("10.213.0.0/16")
SUBNET_PREFIX_LEN = 24
GATEWAY_HOST = 1
# Node addresses start at .11 so they read like a small rack: .11, .12, ...
FIRST_NODE_HOST = 11
NAMESPACE_PREFIX = "dslab-"
BRIDGE_PREFIX = "dsbr-"
VETH_PREFIX = "dsv-"
# Six hex digits keep `dsv-<tag>-<n>` within Linux's 15-character names.
TAG_LENGTH = 6
NODE_DEVICE = "eth0"
# `ip` and `nft` answer in milliseconds; longer means the machine is wedged.
COMMAND_TIMEOUT_S = 10.0
# Where `ip netns add` bind-mounts namespaces and the kernel lists devices.
NETNS_DIR = Path("/run/netns")
DEVICES_DIR = Path("/sys/class/net")
# Serialises subnet claims between labs of the whole machine (root only).
MACHINE_LOCK = Path("/run/lock/dslab-netns.lock")
NFT_FAMILY = "inet"
# Route types that `ip route` prints before the destination.
ROUTE_TYPES = frozenset({"local", "broadcast", "unicast", "multicast", "anycast",
                         "blackhole", "unreachable", "prohibit", "throw", "nat"})
# Devices of a deleted namespace disappear within milliseconds; this bounds
# the wait on a loaded machine.
TEARDOWN_SETTLE_S = 3.0
POLL_S = 0.02
# What nft says when asked to delete a table that does not exist.
NFT_NO_SUCH_TABLE = "No such file or directory"


class Network(StrEnum):
    """How lab nodes are connected."""

    LOOPBACK = "loopback"  # every node on 127.0.0.1, one shared network stack
    NETNS = "netns"  # every node in its own namespace, on a private bridge
    # Every node on its own 127.0.0.x address behind a lab fault proxy, so
    # every path between lab parts can be cut or slowed without root.
    PROXY = "proxy"


class NetworkUnavailable(EnvironmentProblem):
    """This machine (or user) cannot build the lab's private network."""


@dataclass(frozen=True)
class NodeLink:
    """A node's place on the lab LAN."""

    name: str  # the lab node, e.g. "redis-1"
    namespace: str
    address: str
    veth: str  # the host end of its veth pair


@dataclass(frozen=True)
class LabNetwork:
    """The lab's private LAN, as recorded in ``state.json``."""

    tag: str
    subnet: str
    bridge: str
    gateway: str
    nodes: tuple[NodeLink, ...]

    def node(self, name: str) -> NodeLink | None:
        for link in self.nodes:
            if link.name == name:
                return link
        return None

    def addresses(self) -> dict[str, str]:
        """Node name -> address, the shape ``topology.plan`` takes."""
        return {link.name: link.address for link in self.nodes}

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": Network.NETNS.value,
            "tag": self.tag,
            "subnet": self.subnet,
            "bridge": self.bridge,
            "gateway": self.gateway,
            "nodes": [
                {"name": n.name, "namespace": n.namespace, "address": n.address,
                 "veth": n.veth}
                for n in self.nodes
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LabNetwork:
        return cls(
            tag=str(data["tag"]),
            subnet=str(data["subnet"]),
            bridge=str(data["bridge"]),
            gateway=str(data["gateway"]),
            nodes=tuple(
                NodeLink(str(n["name"]), str(n["namespace"]), str(n["address"]),
                         str(n["veth"]))
                for n in data["nodes"]
            ),
        )


def lab_tag(home: Path) -> str:
    """A short name for the lab in ``home``: the same folder, the same tag."""
    digest = hashlib.sha256(str(home.absolute()).encode("utf-8")).hexdigest()
    return digest[:TAG_LENGTH]


def namespace_name(tag: str, node: str) -> str:
    return f"{NAMESPACE_PREFIX}{tag}-{node}"


def exec_prefix(namespace: str) -> list[str]:
    """The argv prefix that runs a command inside ``namespace``.

    ``ip netns exec`` replaces itself with the command (exec), so the pid the
    supervisor records is the node's own.
    """
    return ["ip", "netns", "exec", namespace]


def require_support() -> None:
    """Refuse early, with the reason, where namespaces cannot be made."""
    if not sys.platform.startswith("linux"):
        raise NetworkUnavailable(
            f"--network netns needs Linux network namespaces; this is "
            f"{sys.platform}",
            fix="use the default `--network loopback`",
        )
    if os.geteuid() != 0:
        raise NetworkUnavailable(
            f"--network netns needs root (running as uid {os.geteuid()})",
            fix="run `sudo dslab lab up --network netns ...`, or use the default "
            "`--network loopback`",
        )
    missing = [tool for tool in ("ip", "nft") if shutil.which(tool) is None]
    if missing:
        raise NetworkUnavailable(
            f"--network netns needs {' and '.join(missing)}, not found on PATH",
            fix="install iproute2 and nftables (apt-get install iproute2 "
            "nftables)",
        )


def plan_network(home: Path, node_names: list[str]) -> LabNetwork:
    """Names and addresses for ``node_names`` on a /24 nobody routes yet."""
    tag = lab_tag(home)
    subnet = free_subnet(_routed_networks())
    hosts = list(subnet.hosts())
    links = tuple(
        NodeLink(name, namespace_name(tag, name),
                 str(hosts[FIRST_NODE_HOST - 1 + index]),
                 f"{VETH_PREFIX}{tag}-{index + 1}")
        for index, name in enumerate(node_names)
    )

    return LabNetwork(tag, str(subnet), f"{BRIDGE_PREFIX}{tag}",
                      str(hosts[GATEWAY_HOST - 1]), links)


def create(network: LabNetwork) -> None:
    """Build the bridge, one namespace per node, and wire them together.

    The subnet is checked again and claimed (the bridge's address adds its
    route) under a machine-wide lock, so two labs starting at the same moment
    cannot both take it.
    """
    prefix = f"/{SUBNET_PREFIX_LEN}"
    with _machine_lock():
        subnet = ipaddress.IPv4Network(network.subnet)
        if any(subnet.overlaps(routed) for routed in _routed_networks()):
            raise NetworkUnavailable(
                f"{subnet} was routed by someone else while this lab started",
                fix="run the same `dslab lab up` again: it picks a free subnet",
            )
        _ip("link", "add", network.bridge, "type", "bridge")
        _ip("addr", "add", network.gateway + prefix, "dev", network.bridge)
    _ip("link", "set", network.bridge, "up")
    for link in network.nodes:
        _ip("netns", "add", link.namespace)
        _ip("link", "add", link.veth, "type", "veth", "peer", "name", NODE_DEVICE,
            "netns", link.namespace)
        _ip("link", "set", link.veth, "master", network.bridge, "up")
        _ip("-n", link.namespace, "addr", "add", link.address + prefix, "dev",
            NODE_DEVICE)
        _ip("-n", link.namespace, "link", "set", NODE_DEVICE, "up")
        # Some programs talk to themselves on 127.0.0.1; give them a loopback.
        _ip("-n", link.namespace, "link", "set", "lo", "up")
    log.info("lab network up: %s on %s, %d namespaces", network.bridge,
             network.subnet, len(network.nodes))


def leftovers(tag: str) -> list[str]:
    """Namespaces and devices that carry ``tag``; read from the file system,
    so it costs no subprocess and needs no root."""
    found = []
    if NETNS_DIR.is_dir():
        found += sorted(entry.name for entry in NETNS_DIR.iterdir()
                        if entry.name.startswith(f"{NAMESPACE_PREFIX}{tag}-"))
    if DEVICES_DIR.is_dir():
        found += sorted(entry.name for entry in DEVICES_DIR.iterdir()
                        if entry.name == f"{BRIDGE_PREFIX}{tag}"
                        or entry.name.startswith(f"{VETH_PREFIX}{tag}-"))
    return found


def teardown(tag: str) -> list[str]:
    """Delete every namespace, veth and bridge of the lab ``tag``; what went.

    Namespaces go first: that also takes their nftables rules. A namespace
    whose last process is not yet gone lives on after ``ip netns delete``,
    and so would its veth, so host ends are deleted by name too.
    """
    removed = []
    namespaces = [name for name in leftovers(tag) if name.startswith(NAMESPACE_PREFIX)]
    for namespace in namespaces:
        if _ip_quiet("netns", "delete", namespace):
            removed.append(namespace)
    devices = [name for name in leftovers(tag) if not name.startswith(NAMESPACE_PREFIX)]
    # Veths before the bridge, whose ports they are.
    for device in sorted(devices, key=lambda name: name.startswith(BRIDGE_PREFIX)):
        if _ip_quiet("link", "delete", device):
            removed.append(device)
    remaining = _settled_leftovers(tag)
    if remaining:
        raise NetworkUnavailable(
            f"could not remove {', '.join(remaining)}",
            fix="a process may still run inside; stop it, then run "
            "`dslab lab down --force` again",
        )
    if removed:
        log.info("lab network removed: tag %s, %d objects", tag, len(removed))

    return removed


# -- nftables inside a namespace --------------------------------------------


def namespace_exists(namespace: str) -> bool:
    return (NETNS_DIR / namespace).exists()


def load_ruleset(namespace: str, ruleset: str) -> None:
    """``nft -f -`` inside ``namespace``; raises with nft's words on failure."""
    done = _run([*exec_prefix(namespace), "nft", "-f", "-"], ruleset)
    if done.returncode != 0:
        raise NetworkUnavailable(
            f"nft refused the rules for {namespace}: {done.stderr.strip()}",
            fix="check that the kernel has nf_tables (`dslab doctor`)",
        )


def delete_table(namespace: str, table: str, family: str = NFT_FAMILY) -> bool:
    """Delete one table in ``namespace``; False when it (or the namespace)
    was already gone. Raises when nft fails for another reason."""
    if not namespace_exists(namespace):
        return False
    done = _run([*exec_prefix(namespace), "nft", "delete", "table", family, table])
    if done.returncode == 0:
        return True
    if NFT_NO_SUCH_TABLE in done.stderr or not namespace_exists(namespace):
        return False
    raise NetworkUnavailable(
        f"could not delete nftables table {family} {table} in {namespace}: "
        f"{done.stderr.strip()}",
        fix=f"delete it by hand: ip netns exec {namespace} nft delete table "
        f"{family} {table}",
    )


def list_tables(namespace: str) -> list[str]:
    """``family name`` of every nftables table in ``namespace``."""
    done = _run([*exec_prefix(namespace), "nft", "list", "tables"])
    if done.returncode != 0:
        return []
    return [line.removeprefix("table ").strip()
            for line in done.stdout.splitlines() if line.startswith("table ")]


# -- internals ----------------------------------------------------------------


def _run(argv: list[str], stdin: str | None = None
         ) -> subprocess.CompletedProcess[str]:
    log.debug("running: %s", " ".join(argv))
    try:
        return subprocess.run(argv, input=stdin, capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetworkUnavailable(
            f"`{' '.join(argv)}` failed: {exc}",
            fix="check that iproute2 and nftables work (`dslab doctor`)",
        ) from exc


def _ip(*args: str) -> None:
    done = _run(["ip", *args])
    if done.returncode != 0:
        raise NetworkUnavailable(
            f"`ip {' '.join(args)}` failed: {done.stderr.strip()}",
            fix="run as root on a kernel with netns, veth and bridge support "
            "(`dslab doctor` checks); containers may lack CAP_SYS_ADMIN",
        )


def _ip_quiet(*args: str) -> bool:
    """Run ``ip``; True if it did something, False if there was nothing."""
    done = _run(["ip", *args])
    if done.returncode != 0:
        log.debug("ip %s: %s", " ".join(args), done.stderr.strip())
    return done.returncode == 0


@contextlib.contextmanager
def _machine_lock() -> Iterator[None]:
    """One lab at a time picks and claims a subnet on this machine."""
    MACHINE_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(MACHINE_LOCK, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _settled_leftovers(tag: str) -> list[str]:
    """The kernel frees a deleted namespace's devices in the background; give
    it a moment before calling anything a leftover."""
    deadline = time.monotonic() + TEARDOWN_SETTLE_S
    while (remaining := leftovers(tag)) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    return remaining


def _routed_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 destination in every routing table, except the default."""
    done = _run(["ip", "-4", "-o", "route", "show", "table", "all"])
    networks = []
    for line in done.stdout.splitlines():
        words = line.split()
        if not words:
            continue
        # Local and broadcast routes start with their type word.
        destination = words[1] if words[0] in ROUTE_TYPES else words[0]
        if destination == "default":
            continue
        try:
            networks.append(ipaddress.IPv4Network(destination, strict=False))
        except ValueError:
            continue
    return networks


def free_subnet(routed: list[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
    for subnet in SUBNET_POOL.subnets(new_prefix=SUBNET_PREFIX_LEN):
        if not any(subnet.overlaps(network) for network in routed):
            return subnet
    raise NetworkUnavailable(
        f"every /{SUBNET_PREFIX_LEN} in {SUBNET_POOL} is already routed on this "
        "machine",
        fix="stop other netns labs (`dslab lab down` in their folders) or "
        "remove the routes that cover 10.213.0.0/16",
    )
