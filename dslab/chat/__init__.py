"""The chat service: a multi-server WebSocket chat on Redis Streams.

Public API for the CLI, the workload and the tests:

- ``ChatConfig``, ``start_server``, ``RunningServer`` (``server.py``): run a
  server in this process; ``python -m dslab.chat`` runs one as a process;
- ``ChatClient`` (``client.py``): the resuming, retrying asyncio client;
- ``Delivery``: ``streams`` (the real design) or ``pubsub`` (the naive one).

The wire protocol is ``protocol.py`` and ``docs/chat-protocol.md``.
"""

from dslab.chat.client import Ack, ChatClient, Message
from dslab.chat.fanout import Delivery
from dslab.chat.server import ChatConfig, ChatServer, RunningServer, start_server

__all__ = [
    "Ack",
    "ChatClient",
    "ChatConfig",
    "ChatServer",
    "Delivery",
    "Message",
    "RunningServer",
    "start_server",
]
