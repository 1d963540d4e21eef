"""Network partitions between lab nodes: real nftables drop rules in namespaces.

Partitions need a lab started with ``--network netns`` (root, Linux): every
node then has its own network stack, so a rule in one node's namespace cuts
that node's links and nobody else's. A partition is two sides; every packet
from a member of one side to a member of the other is dropped, silently, as
a dead switch port would. The side ``host`` is the host end of the lab LAN:
clients, chat and shortener servers, fault proxies, dslab itself.

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
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from dslab.chaos.heal import schedule_heal
from dslab.chaos.journal import Fault, Journal
from dslab.chaos.targets import resolve
from dslab.errors import EnvironmentProblem, UsageError
from dslab.lab import netns
from dslab.lab.lab import Lab
from dslab.lab.netns import LabNetwork

log = logging.getLogger(__name__)

# The host end of the lab LAN, as a partition side member.
HOST = "host"
TABLE_PREFIX = "dslab_partition_"
UNDO_ACTION = "nft-delete-table"


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
class PartitionOutcome:
    fault: Fault
    table: str
    rules: tuple[Rules, ...]
    cuts: tuple[tuple[str, str], ...] = field(default=())  # (from, to) names


def require_netns(lab: Lab) -> LabNetwork:
    """The lab's LAN; exit 3 with the way forward when it has none."""
    network = lab.network()
    if network is None:
        raise PartitionsNeedNetns(
            "partitions need `lab up --network netns` (root); this lab runs "
            "every node on 127.0.0.1 in one shared network stack, where no rule "
            "can cut one node off without the others",
            fix="run `dslab lab down`, then as root `dslab lab up --network netns` "
            "(with your --topology); without root, a fault proxy in front of a "
            "node can black-hole its clients (see docs/fault-proxy.md)",
        )
    netns.require_support()
    return network


def resolve_side(
    lab: Lab, network: LabNetwork, text: str, rng: random.Random
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
                    f"{name} runs in the host's network namespace, not on the "
                    "lab LAN",
                    fix="cut the whole host side with `host` (clients, services "
                    "and dslab itself share it)",
                )
            if name not in members:
                members.append(name)
    return members


def everyone_but(network: LabNetwork, names: Sequence[str]) -> list[str]:
    """Every node of the LAN and the host, except ``names``: for ``--isolate``."""
    return [link.name for link in network.nodes if link.name not in names] + [HOST]


def plan_rules(
    network: LabNetwork, side_a: Sequence[str], side_b: Sequence[str],
    *, one_way: bool = False,
) -> tuple[tuple[Rules, ...], tuple[tuple[str, str], ...]]:
    """The drops per namespace that cut A from B (and B from A unless
    ``one_way``), and the directed cuts they make. Pure: no rule is loaded."""
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


def partition(
    lab: Lab, side_a: Sequence[str], side_b: Sequence[str], *,
    one_way: bool = False, duration_s: float | None = None,
) -> PartitionOutcome:
    """Cut A from B with nftables rules; journaled first, see the module."""
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


def _address(network: LabNetwork, name: str) -> str:
    if name == HOST:
        return network.gateway
    link = network.node(name)
    if link is None:
        raise UsageError(f"{name} is not on the lab LAN")
    return link.address
