"""What this machine can do for the lab, each answer found by trying it.

Kernel features are probed inside a throwaway network namespace, so the probe
never touches the machine's own interfaces: netem in particular is missing
from many VM kernels (``tc`` then says "Specified qdisc kind is unknown"),
and only trying it tells.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

from dslab.errors import DslabError
from dslab.lab.redis_binary import find_redis_server

PROBE_TIMEOUT_S = 10.0
NETEM_MISSING_HINT = "Specified qdisc kind is unknown"


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = False


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True,
                          timeout=PROBE_TIMEOUT_S, check=False)


def check_redis(explicit: str | None) -> Check:
    try:
        binary = find_redis_server(explicit)
    except DslabError as exc:
        return Check("redis-server", False, exc.message, exc.fix or "", True)
    return Check("redis-server", True,
                 f"{binary.version_text} at {binary.path} (from {binary.source})",
                 required=True)


def check_root() -> Check:
    if os.geteuid() == 0:
        return Check("root", True, "running as root")
    return Check("root", False, f"running as uid {os.geteuid()}",
                 "run as root for namespaces, nftables and tc; process faults "
                 "and the fault proxy work without it")


@contextlib.contextmanager
def throwaway_namespace() -> Iterator[str | None]:
    """A network namespace that exists only for the probe (None if impossible)."""
    name = f"dslab-doctor-{os.getpid()}"
    if os.geteuid() != 0 or not shutil.which("ip"):
        yield None
        return
    created = _run(["ip", "netns", "add", name]).returncode == 0
    try:
        yield name if created else None
    finally:
        if created:
            _run(["ip", "netns", "delete", name])


def check_netns(namespace: str | None) -> Check:
    if not shutil.which("ip"):
        return Check("network namespaces", False, "`ip` not found",
                     "apt-get install iproute2")
    if os.geteuid() != 0:
        return Check("network namespaces", False, "needs root", "run as root")
    if namespace is None:
        return Check("network namespaces", False,
                     "`ip netns add` failed (no CAP_SYS_ADMIN in this container?)",
                     "run on a host or a privileged container")
    return Check("network namespaces", True, "created and removed a namespace")


def check_nftables(namespace: str | None) -> Check:
    if not shutil.which("nft"):
        return Check("nftables", False, "`nft` not found",
                     "apt-get install nftables (partitions fall back to the proxy)")
    if namespace is None:
        return Check("nftables", False, "cannot probe without a namespace (root)",
                     "run as root")
    done = _run(["ip", "netns", "exec", namespace, "nft", "list", "tables"])
    if done.returncode != 0:
        return Check("nftables", False, done.stderr.strip()[:120],
                     "load the nf_tables module (modprobe nf_tables)")
    version = _run(["nft", "--version"]).stdout.strip()
    return Check("nftables", True, f"{version}; rules work in a namespace")


def check_tc() -> Check:
    if not shutil.which("tc"):
        return Check("tc", False, "`tc` not found", "apt-get install iproute2")
    return Check("tc", True, _run(["tc", "-V"]).stdout.strip() or "present")


def check_netem(namespace: str | None) -> Check:
    if not shutil.which("tc"):
        return Check("tc netem", False, "`tc` not found", "apt-get install iproute2")
    if namespace is None:
        return Check("tc netem", False, "cannot probe without a namespace (root)",
                     "run as root, or use `chaos delay --backend proxy`")
    done = _run(["ip", "netns", "exec", namespace, "tc", "qdisc", "add", "dev",
                 "lo", "root", "netem", "delay", "1ms"])
    if done.returncode == 0:
        return Check("tc netem", True, "the kernel has sch_netem")
    reason = done.stderr.strip().splitlines()[0] if done.stderr.strip() else "failed"
    if NETEM_MISSING_HINT in done.stderr:
        reason = f"kernel has no sch_netem ({reason})"
    return Check("tc netem", False, reason,
                 "use `dslab chaos delay --backend proxy` (no kernel support "
                 "needed), or `modprobe sch_netem` on a kernel that ships it")


def check_chromium() -> Check:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            version = _run([path, "--version"]).stdout.strip()
            return Check("headless chromium", True, f"{version} at {path}")
    return Check("headless chromium", False, "not found",
                 "apt-get install chromium (only the browser tests need it)")


def run_checks(redis_server: str | None = None) -> list[Check]:
    checks = [check_redis(redis_server), check_root()]
    with throwaway_namespace() as namespace:
        checks += [
            check_netns(namespace),
            check_nftables(namespace),
            check_tc(),
            check_netem(namespace),
        ]
    checks.append(check_chromium())
    return checks
