"""Event sources behind one interface.

A bus is a Twisted service that delivers (channel, envelope bytes) to the
router.  ``memory`` is embedded (no Redis needed); ``redis`` consumes
AutoGPT's classic PSUBSCRIBE channels; ``redis-cluster`` consumes the
sharded SSUBSCRIBE channels of a Redis Cluster; ``auto`` asks the
configured Redis which of the two it is and runs that one.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService
from zope.interface import Attribute


class IEventBus(IService):
    kind = Attribute("short name of the bus, for logs: memory, redis, redis-cluster, auto")

    def ready() -> tuple[bool, str]:
        """(True, "") when connected and subscribed, else (False, why)."""

    def describe() -> str:
        """Where the bus reads from, for the startup line (no secrets)."""

    def producer() -> "tuple[Any, bool] | None":
        """(publisher, sharded) for producers in this process (the demo
        executor): something with ``publish(channel, data)``, and whether it
        takes the sharded channel names; None while the bus cannot say."""
