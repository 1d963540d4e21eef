"""Redis clients for a ``RedisTarget``: standalone, Sentinel or Cluster.

The one place where dslab turns a ``--redis`` URL into a redis-py client, for
the servers (asyncio) and the CLI (blocking). Callers get an object with the
ordinary redis-py command API whatever the deployment; with Sentinel the
client asks the Sentinels for the current primary on every reconnect, so it
follows a failover by itself.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.cluster import ClusterNode, RedisCluster
from redis.sentinel import Sentinel

from dslab.settings import RedisKind, RedisTarget

# Long enough for a loaded two-core machine, short enough that a dead node is
# noticed within a Sentinel or Cluster failover window.
SOCKET_TIMEOUT_S = 2.0
CONNECT_TIMEOUT_S = 1.0
# redis-py's asyncio pools fail a command outright once 100 connections are
# busy; a server holds one per followed chat room (XREAD BLOCK) plus its
# commands in flight, so it may need more. Per node on Cluster.
MAX_CONNECTIONS = 1024


def _common(target: RedisTarget, decode: bool) -> dict[str, Any]:
    return {
        "username": target.username,
        "password": target.password,
        "ssl": target.tls,
        "socket_timeout": SOCKET_TIMEOUT_S,
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "decode_responses": decode,
    }


def sync_client(target: RedisTarget, *, decode: bool = True) -> Any:
    """A blocking client (``redis.Redis`` or ``RedisCluster``) for ``target``."""
    options = _common(target, decode)
    if target.kind is RedisKind.CLUSTER:
        nodes = [ClusterNode(host, port) for host, port in target.addresses]
        return RedisCluster(startup_nodes=nodes, **options)
    if target.kind is RedisKind.SENTINEL:
        sentinel = Sentinel(
            list(target.addresses),
            socket_timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
        )
        return sentinel.master_for(target.service, db=target.db, **options)
    host, port = target.addresses[0]
    return redis.Redis(host=host, port=port, db=target.db, **options)


def async_client(
    target: RedisTarget, *, decode: bool = True, max_connections: int = MAX_CONNECTIONS
) -> Any:
    """An asyncio client for ``target``; close it with ``await client.aclose()``."""
    options = {**_common(target, decode), "max_connections": max_connections}
    if target.kind is RedisKind.CLUSTER:
        nodes = [AsyncClusterNode(host, port) for host, port in target.addresses]
        return AsyncRedisCluster(startup_nodes=nodes, **options)
    if target.kind is RedisKind.SENTINEL:
        sentinel = AsyncSentinel(
            list(target.addresses),
            socket_timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
        )
        return sentinel.master_for(target.service, db=target.db, **options)
    host, port = target.addresses[0]
    return aioredis.Redis(host=host, port=port, db=target.db, **options)
