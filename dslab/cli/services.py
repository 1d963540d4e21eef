"""Temporary alias of ``dslab.lab.services``, removed once no module imports it."""

from dslab.lab.services import choose_ports, launch, redis_target, running

__all__ = ["choose_ports", "launch", "redis_target", "running"]
