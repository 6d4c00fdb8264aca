"""Event sources behind one interface.

A bus is a Twisted service that delivers (channel, envelope bytes) to the
router.  ``memory`` is embedded (the default: no Redis needed); ``redis``
consumes AutoGPT's classic PSUBSCRIBE channels; ``redis-cluster`` consumes
the sharded SSUBSCRIBE channels of a Redis Cluster.
"""

from __future__ import annotations

from twisted.application.service import IService
from zope.interface import Attribute


class IEventBus(IService):
    kind = Attribute("short name of the bus, for logs: memory, redis, redis-cluster")

    def ready() -> tuple[bool, str]:
        """(True, "") when connected and subscribed, else (False, why)."""

    def describe() -> str:
        """Where the bus reads from, for the startup line (no secrets)."""
