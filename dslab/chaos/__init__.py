"""Fault injection: the fault proxy and the tc netem wrapper (more to come).

The proxy (``dslab.chaos.proxy``) needs no privileges and works everywhere;
netem (``dslab.chaos.netem``) needs root and a kernel with ``sch_netem``.
"""
