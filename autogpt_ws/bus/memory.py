"""The embedded, in-process event bus: what ``python ws.py`` runs on.

Producers in the same process (the demo executor, tests) publish
(channel, envelope) exactly as they would on Redis, and messages take the
same router path as the classic Redis bus, so routing is one code path.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from ..core.router import Router
from . import IEventBus


@implementer(IEventBus)
class MemoryBus(Service):
    kind = "memory"

    def __init__(self, router: Router) -> None:
        self.router = router

    def ready(self) -> tuple[bool, str]:
        return (True, "") if self.running else (False, "event bus stopped")

    def describe(self) -> str:
        return "memory (embedded)"

    def producer(self) -> tuple["MemoryBus", bool]:
        return self, False

    def publish(self, channel: str, data: bytes) -> Deferred[int]:
        """Deliver at once, in order; fires with 1 (one consumer), like
        Redis PUBLISH's receiver count."""
        if not self.running:
            return succeed(0)
        self.router.classic(channel, data)
        return succeed(1)
