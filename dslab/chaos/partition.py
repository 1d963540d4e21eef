"""Network partitions between lab nodes: nftables rules, or cuts on lab proxies.

Partitions need a lab where every node has an address of its own. Two kinds
of lab have one, and each has its backend:

- ``--network netns`` (root, Linux): every node has its own network stack,
  so a rule in one node's namespace cuts that node's links and nobody
  else's: real nftables drops, described below;
- ``--network proxy`` (no privileges): every path between lab parts passes a
  lab fault proxy, and a partition is a *cut* on the proxies of each side:
  B's proxies black-hole connections from A's addresses (and A's from B's,
  unless one-way). See "Proxy cuts" below.

A partition is two sides; every packet from a member of one side to a
member of the other is dropped, silently, as a dead switch port would. The
side ``host`` is the host end of the lab LAN: clients, chat and shortener
servers, fault proxies, dslab itself (on a proxy lab: everything that
connects from 127.0.0.1).

One partition is one fault, and one nftables table per namespace it touches,
``table inet dslab_partition_<fault id>``, holding:

- an ``input`` chain that drops packets *from* the other side's addresses;
- an ``output`` chain, only where the other side is ``host``, that drops
  packets *to* the bridge's gateway (rules never go into the host's own
  ruleset, so the machine's firewall is never touched).

Guarantees:

- the fault is journaled, with its undo as data (``nft-delete-table`` with
  the table and namespaces), before any rule is loaded; with ``--for`` the
  healer is started before the rules too;
- a partition whose rules could not all be loaded is rolled back at once and
  marked healed as ``not applied``;
- partitions compose: each is its own table, and healing one leaves the
  others in place. Deleting a namespace (``lab down``) also deletes its tables.

Attention: ``one_way`` drops A -> B only. TCP needs both directions, so no
connection between A and B works either way; what still flows is B's
packets arriving at A (B's SYNs, B's data that A never acknowledges).

Proxy cuts: one partition is one fault and one named cut (its fault id) on
every proxy in front of a node that must stop hearing from the other side;
the undo (``proxy-uncut``) lists those proxies with their pid and start time
and lifts the cut by name, so it is idempotent, composes with other
partitions and delays on the same proxies, and a proxy that is gone took its
cut with it. The journal discipline is the nftables one: journaled (and the
``--for`` healer started) before any proxy is touched, rolled back when not
every proxy took the cut. Differences from nftables worth knowing:

- a cut matches *connections by who opened them*: ``--one-way A B`` stops
  the connections A opens to B in both directions, while B's connections to
  A keep working in full (nftables would break both);
- nodes never open connections to the host, so cutting a node *from* the
  host (``--one-way redis-1 host``) has nothing to cut and is refused;
- the lab's own probes (``lab status``) go to the nodes directly and still
  see every node; only clients through ``lab.redis_target()`` are cut.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dslab.chaos.heal import schedule_heal
from dslab.chaos.journal import Fault, Journal
from dslab.chaos.proxy import ProxyControl
from dslab.chaos.targets import resolve
from dslab.errors import DslabError, EnvironmentProblem, UsageError
from dslab.lab import netns
from dslab.lab.lab import Lab, is_lab_proxy, network_mode
from dslab.lab.netns import LabNetwork, Network
from dslab.lab.state import LabState, process_matches
from dslab.settings import LOOPBACK_HOST

log = logging.getLogger(__name__)

# The host end of the lab LAN, as a partition side member.
HOST = "host"
TABLE_PREFIX = "dslab_partition_"
UNDO_ACTION = "nft-delete-table"
PROXY_UNDO_ACTION = "proxy-uncut"


class PartitionsNeedNetns(EnvironmentProblem):
    """The lab runs on loopback, where one node cannot be cut off alone."""


@dataclass(frozen=True)
class Rules:
    """The drops one namespace gets for one partition."""

    namespace: str
    drop_from: tuple[str, ...] = ()  # source addresses dropped on input
    drop_to: tuple[str, ...] = ()  # destination addresses dropped on output

    def ruleset(self, table: str) -> str:
        """The ``nft -f`` text that creates ``table`` with these drops."""
        lines = [f"table {netns.NFT_FAMILY} {table} {{"]
        for chain, hook, match, addresses in (
            ("input", "input", "saddr", self.drop_from),
            ("output", "output", "daddr", self.drop_to),
        ):
            if not addresses:
                continue
            lines += [
                f"\tchain {chain} {{",
                f"\t\ttype filter hook {hook} priority filter; policy accept;",
                f"\t\tip {match} {{ {', '.join(addresses)} }} drop",
                "\t}",
            ]
        lines.append("}")
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class ProxyNetwork:
    """A ``--network proxy`` lab as partitions see it: each node's own
    address, the source of every connection the node opens."""

    addresses: Mapping[str, str]

    def node(self, name: str) -> str | None:
        return self.addresses.get(name)

    @classmethod
    def of(cls, state: LabState) -> ProxyNetwork:
        addresses = (state.network or {}).get("addresses", {})
        return cls({str(name): str(address) for name, address in addresses.items()})


@dataclass(frozen=True)
class ProxyCut:
    """The sources one lab proxy black-holes for one partition."""

    proxy: str  # e.g. "proxy-redis-2" or "proxy-redis-2-bus"
    control_url: str
    pid: int
    process_started_at: float
    sources: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"proxy": self.proxy, "control_url": self.control_url,
                "pid": self.pid, "process_started_at": self.process_started_at,
                "sources": list(self.sources)}


@dataclass(frozen=True)
class PartitionOutcome:
    fault: Fault
    table: str  # nftables backend; "" on a proxy lab
    rules: tuple[Rules, ...]
    cuts: tuple[tuple[str, str], ...] = field(default=())  # (from, to) names
    proxy_cuts: tuple[ProxyCut, ...] = ()  # proxy backend


SideNetwork = LabNetwork | ProxyNetwork


def require_netns(lab: Lab) -> LabNetwork:
    """The lab's LAN; exit 3 with the way forward when it has none."""
    network = lab.network()
    if network is None:
        raise PartitionsNeedNetns(
            "partitions need `lab up --network netns` (root); or `lab up "
            "--network proxy`, which needs no root. This lab runs every node on "
            "127.0.0.1 in one shared network stack, where no rule can cut one "
            "node off without the others",
            fix="run `dslab lab down`, then `dslab lab up --network proxy` (no "
            "root: every path between lab parts goes through a fault proxy) or, "
            "as root, `dslab lab up --network netns`, with your --topology",
        )
    netns.require_support()
    return network


def lab_network(lab: Lab) -> SideNetwork:
    """What partitions cut in this lab; exit 3 with the way forward on a
    loopback lab."""
    state = lab.require_state()
    if network_mode(state) is Network.PROXY:
        return ProxyNetwork.of(state)
    return require_netns(lab)


def _node_names(network: SideNetwork) -> list[str]:
    if isinstance(network, ProxyNetwork):
        return list(network.addresses)
    return [link.name for link in network.nodes]


def resolve_side(
    lab: Lab, network: SideNetwork, text: str, rng: random.Random
) -> list[str]:
    """``redis-1,sentinel-1`` or ``primary,host`` as node names (or ``host``)."""
    members: list[str] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            raise UsageError(f"empty name in partition side {text!r}",
                             fix="separate names with single commas: redis-1,redis-2")
        if item == HOST:
            names = [HOST]
        else:
            names = [record.name for record in resolve(lab, item, rng)]
        for name in names:
            if name != HOST and network.node(name) is None:
                raise UsageError(
                    f"{name} runs on the host side (127.0.0.1 or the host's "
                    "network namespace), not on an address of its own",
                    fix="cut the whole host side with `host` (clients, services "
                    "and dslab itself share it)",
                )
            if name not in members:
                members.append(name)
    return members


def everyone_but(network: SideNetwork, names: Sequence[str]) -> list[str]:
    """Every node of the LAN and the host, except ``names``: for ``--isolate``."""
    return [name for name in _node_names(network) if name not in names] + [HOST]


def _directed_cuts(
    side_a: Sequence[str], side_b: Sequence[str], one_way: bool
) -> list[tuple[str, str]]:
    """Every (from, to) pair the partition cuts; refuses impossible sides."""
    overlap = sorted(set(side_a) & set(side_b))
    if overlap:
        raise UsageError(f"{', '.join(overlap)} cannot be on both sides of a "
                         "partition", fix="name each node on one side only")
    if not side_a or not side_b:
        raise UsageError("a partition needs a node on each side",
                         fix="for example: dslab chaos partition redis-1 redis-2")
    cuts = [(a, b) for a in side_a for b in side_b]
    if not one_way:
        cuts += [(b, a) for a in side_a for b in side_b]
    return cuts


def plan_rules(
    network: LabNetwork, side_a: Sequence[str], side_b: Sequence[str],
    *, one_way: bool = False,
) -> tuple[tuple[Rules, ...], tuple[tuple[str, str], ...]]:
    """The drops per namespace that cut A from B (and B from A unless
    ``one_way``), and the directed cuts they make. Pure: no rule is loaded."""
    cuts = _directed_cuts(side_a, side_b, one_way)

    drop_from: dict[str, list[str]] = {}
    drop_to: dict[str, list[str]] = {}
    for source, destination in cuts:
        if destination != HOST:
            # Dropped where it arrives, like a switch port gone dead.
            drop_from.setdefault(destination, []).append(_address(network, source))
        else:
            # The host has no namespace of ours: drop on the way out instead.
            drop_to.setdefault(source, []).append(network.gateway)

    rules = []
    for link in network.nodes:
        if link.name in drop_from or link.name in drop_to:
            rules.append(Rules(link.namespace,
                               tuple(drop_from.get(link.name, ())),
                               tuple(drop_to.get(link.name, ()))))
    return tuple(rules), tuple(cuts)


def plan_cuts(
    state: LabState, side_a: Sequence[str], side_b: Sequence[str],
    *, one_way: bool = False,
) -> tuple[tuple[ProxyCut, ...], tuple[tuple[str, str], ...]]:
    """The cut per lab proxy that partitions A from B on a ``--network
    proxy`` lab, and the directed cuts it makes. Pure: no proxy is asked.

    A cut (from, to) makes every proxy in front of ``to`` black-hole the
    address ``from`` opens its connections from (127.0.0.1 for ``host``).
    """
    network = ProxyNetwork.of(state)
    cuts = _directed_cuts(side_a, side_b, one_way)
    sources: dict[str, set[str]] = {}
    for source, destination in cuts:
        if destination == HOST:
            continue  # nodes never connect to the host: nothing to cut
        address = LOOPBACK_HOST if source == HOST else network.node(source)
        if address is None:
            raise UsageError(f"{source} has no address of its own in this lab")
        sources.setdefault(destination, set()).add(address)

    planned = []
    for record in state.processes:
        if not is_lab_proxy(record):
            continue
        cut_from = sources.get(str(record.extra.get("in_front_of")))
        if cut_from:
            planned.append(ProxyCut(record.name, str(record.extra["control_url"]),
                                    record.pid, record.started_at,
                                    tuple(sorted(cut_from))))
    if not planned:
        raise UsageError(
            "this partition cuts nothing: lab nodes never open connections to "
            "the host, so there is no connection from them to stop",
            fix="to keep clients away from a node, cut the other way round: "
            "dslab chaos partition host redis-1 --one-way",
        )
    return tuple(planned), tuple(cuts)


def partition(
    lab: Lab, side_a: Sequence[str], side_b: Sequence[str], *,
    one_way: bool = False, duration_s: float | None = None,
) -> PartitionOutcome:
    """Cut A from B with nftables rules or proxy cuts, whichever the lab
    allows; journaled first, see the module."""
    if lab.network_mode() is Network.PROXY:
        return _partition_proxies(lab, side_a, side_b, one_way=one_way,
                                  duration_s=duration_s)
    network = require_netns(lab)
    rules, cuts = plan_rules(network, side_a, side_b, one_way=one_way)
    arrow = "cannot reach" if one_way else "cut off from"
    journal = Journal(lab.home)
    with journal.locked():
        fault_id = journal.next_id()
        table = f"{TABLE_PREFIX}{fault_id}"
        now = time.time()
        fault = Fault(
            id=fault_id, kind="partition", target=",".join(side_a), pid=None,
            params={"summary": f"({arrow} {','.join(side_b)})",
                    "sides": [list(side_a), list(side_b)], "one_way": one_way,
                    "table": f"{netns.NFT_FAMILY} {table}"},
            started_at=now,
            until=None if duration_s is None else now + duration_s,
            undo={"action": UNDO_ACTION, "family": netns.NFT_FAMILY,
                  "table": table, "namespaces": [r.namespace for r in rules]},
            remedy="dslab chaos heal",
        )
        journal.record_applied(fault)
        if fault.until is not None:
            schedule_heal(lab.home, fault, fault.until)
        _load(journal, fault, table, rules)
        log.info("fault applied: %s (undo: dslab chaos heal %s)",
                 fault.describe(), fault.id)

    return PartitionOutcome(fault, table, rules, cuts)


def _load(journal: Journal, fault: Fault, table: str, rules: Sequence[Rules]
          ) -> None:
    """Load every namespace's rules, or none: a failure rolls back the rest."""
    try:
        for rule in rules:
            netns.load_ruleset(rule.namespace, rule.ruleset(table))
    except EnvironmentProblem as error:
        for rule in rules:
            try:
                netns.delete_table(rule.namespace, table)
            except EnvironmentProblem as cleanup_error:
                log.warning("partition rollback failed in %s: %s",
                            rule.namespace, cleanup_error.message)
                raise error from None
        journal.record_healed(fault.id, f"not applied: {error.message}")
        raise


def _partition_proxies(
    lab: Lab, side_a: Sequence[str], side_b: Sequence[str], *,
    one_way: bool, duration_s: float | None,
) -> PartitionOutcome:
    """The proxy backend of ``partition``: one named cut per proxy."""
    state = lab.require_state()
    proxy_cuts, cuts = plan_cuts(state, side_a, side_b, one_way=one_way)
    down = [cut.proxy for cut in proxy_cuts
            if not state.find(cut.proxy).is_alive()]
    if down:
        raise EnvironmentProblem(
            f"{', '.join(down)} is not running, so the partition could not "
            "cut its links",
            fix="bring the lab's proxies back with `dslab lab up` (same "
            "options), then partition again",
        )
    arrow = "cannot reach" if one_way else "cut off from"
    journal = Journal(lab.home)
    with journal.locked():
        fault_id = journal.next_id()
        now = time.time()
        fault = Fault(
            id=fault_id, kind="partition", target=",".join(side_a), pid=None,
            params={"summary": f"({arrow} {','.join(side_b)})",
                    "sides": [list(side_a), list(side_b)], "one_way": one_way,
                    "backend": "proxy",
                    "proxies": [cut.proxy for cut in proxy_cuts]},
            started_at=now,
            until=None if duration_s is None else now + duration_s,
            undo={"action": PROXY_UNDO_ACTION, "cut": fault_id,
                  "proxies": [cut.to_json() for cut in proxy_cuts]},
            remedy="dslab chaos heal",
        )
        journal.record_applied(fault)
        if fault.until is not None:
            schedule_heal(lab.home, fault, fault.until)
        _cut(journal, fault, proxy_cuts)
        log.info("fault applied: %s (undo: dslab chaos heal %s)",
                 fault.describe(), fault.id)

    return PartitionOutcome(fault, "", (), cuts, proxy_cuts)


def _cut(journal: Journal, fault: Fault, proxy_cuts: Sequence[ProxyCut]) -> None:
    """Set the cut on every proxy, or on none: a failure lifts it everywhere."""
    try:
        for cut in proxy_cuts:
            ProxyControl(cut.control_url).set_cut(fault.id, cut.sources)
    except DslabError as error:
        stuck = False
        for cut in proxy_cuts:
            try:
                ProxyControl(cut.control_url).remove_cut(fault.id)
            except DslabError as cleanup_error:
                # A proxy that died took its cut with it; one that lives on
                # keeps the fault active, for `chaos heal` to retry.
                if process_matches(cut.pid, cut.process_started_at):
                    stuck = True
                    log.warning("partition rollback failed on %s: %s",
                                cut.proxy, cleanup_error.message)
        if not stuck:
            journal.record_healed(fault.id, f"not applied: {error.message}")
        raise


def _address(network: LabNetwork, name: str) -> str:
    if name == HOST:
        return network.gateway
    link = network.node(name)
    if link is None:
        raise UsageError(f"{name} is not on the lab LAN")
    return link.address
