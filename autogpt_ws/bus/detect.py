"""``event_bus: auto`` with a Redis configured: ask that Redis what it is.

AutoGPT names no bus in its deployments: the websocket service is given
``REDIS_HOST``/``REDIS_PORT`` (or ``REDIS_CLUSTER_*``), and the Redis there
is a cluster (every image since 2026-04-28 publishes with ``SPUBLISH`` on
one) or a single node (older images, classic ``PUBLISH``).  This bus
connects to that address, logs in, asks ``INFO cluster`` and then runs the
matching bus as its child: ``redis-cluster`` when it says
``cluster_enabled:1``, the classic ``redis`` bus otherwise, and logs which.

Until it knows (the Redis is unreachable, or refuses the password) it tries
again with backoff (0.5 s doubling to 8 s, with jitter) and ``/ready``
answers 503 saying why.  Each attempt asks the next address of the seed
list in turn (the seed, then each of ``REDIS_CLUSTER_NODES``), so one node
down, or a list with no seed of its own, does not stop it.  A bus found
but not built (its construction or start fails) is logged and the
question asked again, with the same backoff.  Sockets are served
meanwhile; subscriptions they make are taken over by the bus once it
starts.  The question is asked once per start: a Redis does not change
kind under a running server.
"""

from __future__ import annotations

import random
from typing import Any, Callable

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..config import Settings
from . import IEventBus
from .redis_client import describe_error
from .resp import RedisProtocol, connect, handshake
from .shard import ConnectOptions, backoff, hang_up
from .slots import Address, format_address, seed_nodes

log = Logger()


def cluster_enabled(info: bytes | str) -> bool:
    """Whether an ``INFO cluster`` answer says ``cluster_enabled:1``."""
    text = info.decode("utf-8", "replace") if isinstance(info, bytes) else info
    return any(line.strip() == "cluster_enabled:1" for line in text.splitlines())


@implementer(IEventBus)
class AutoBus(MultiService):
    kind = "auto"
    name = "auto-bus"

    def __init__(self, settings: Settings, reactor: Any, build: Callable[[str], IEventBus], *,
                 rng: Callable[[], float] = random.random) -> None:
        """``build(kind)`` makes the bus found: ``redis-cluster`` or ``redis``."""
        super().__init__()
        self.settings = settings
        self.reactor = reactor
        self.build = build
        self.rng = rng
        self.seeds: list[Address] = seed_nodes(settings)
        self.address: Address = self.seeds[0]  # the one asked last (or first, before any attempt)
        self.inner: IEventBus | None = None
        self.attempts = 0
        self._reason = "not started"
        self._logged = ""
        self._retry: Any = None
        self._asking: Deferred[Any] | None = None

    # -- IEventBus, answered by the bus found once there is one -----------------------

    def ready(self) -> tuple[bool, str]:
        if self.inner is not None:
            return self.inner.ready()
        if not self.running:
            return False, "event bus stopped"
        return False, f"finding out whether the Redis at {format_address(self.address)} is a cluster: {self._reason}"

    def describe(self) -> str:
        if self.inner is not None:
            return self.inner.describe()
        return f"auto (asking the Redis at {format_address(self.address)} whether it is a cluster)"

    def producer(self) -> tuple[Any, bool] | None:
        return self.inner.producer() if self.inner is not None else None

    def hand_over(self, timeout: float) -> Any:
        hand_over = getattr(self.inner, "hand_over", None)
        return hand_over(timeout) if hand_over is not None else None

    @property
    def gate(self) -> Any:
        """The found bus's SubscriptionGate, if it has one."""
        return getattr(self.inner, "gate", None)

    # -- lifecycle ------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._reason = "connecting"
        self._ask()

    def stopService(self) -> Deferred[None]:
        stopped = super().stopService()  # not running from here: a cancelled question is not retried
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._asking is not None:
            self._asking.cancel()
        return stopped  # type: ignore[no-any-return]

    # -- asking -------------------------------------------------------------------

    def _ask(self) -> None:
        self._retry = None
        if not self.running or self.inner is not None:
            return
        self.address = self.seeds[self.attempts % len(self.seeds)]  # round-robin over the seeds
        self.attempts += 1
        self._asking = d = self._info()
        # chained, not side by side: a failure in _answered lands in _failed too
        d.addCallback(self._answered).addErrback(self._failed)

    @inlineCallbacks
    def _info(self) -> Any:
        o = ConnectOptions.from_settings(self.settings)
        host, port = self.address
        conn: RedisProtocol = yield connect(self.reactor, host, port, timeout=o.timeout, tls=o.tls, ca_file=o.ca_file)
        deadline = self.reactor.callLater(o.timeout, conn.transport.abortConnection)
        try:
            yield handshake(conn, o.username, o.password, 0, "autogpt-ws-detect")
            info = yield conn.command("INFO", "cluster")
        finally:
            yield hang_up(conn, deadline)
        return cluster_enabled(info)

    def _answered(self, is_cluster: bool) -> None:
        self._asking = None
        if not self.running:
            return
        kind = "redis-cluster" if is_cluster else "redis"
        what = "a Redis Cluster (cluster_enabled:1)" if is_cluster else "a single Redis (cluster_enabled:0)"
        address = format_address(self.address)
        bus: Any = None
        try:
            bus = self.build(kind)
            self.inner = bus
            bus.setServiceParent(self)  # started at once: we are running
        except Exception:
            self.inner = None
            if bus is not None and bus.parent is self:  # added, then its start failed: taken out again
                try:
                    bus.disownServiceParent()
                except Exception:
                    log.failure("removing the {kind} event bus that failed to start failed", kind=kind, bus=kind)
            failure = Failure()
            self._reason = f"cannot start the {kind} event bus: {describe_error(failure.value)}"
            delay = self._again()
            log.failure("the Redis at {address} is {what}, but the {kind} event bus could not be started; "
                        "asking again in {delay:.1f}s", failure, address=address, what=what, kind=kind, bus=kind,
                        delay=delay, attempts=self.attempts)
            return
        log.info("the Redis at {address} is {what}: using the {kind} event bus", address=address,
                 what=what, kind=kind, bus=kind)
        if is_cluster and not self.settings.database_url:
            log.error("DATABASE_URL is not set: on a Redis Cluster, subscribe_graph_execution needs AutoGPT's "
                      "database to find an execution's graph; those subscribes will get an error reply")
        log.info("event bus {bus}", bus=bus.describe())

    def _again(self) -> float:
        """Ask again after the backoff of this attempt; returns the delay."""
        delay = backoff(self.attempts, self.rng)
        self._retry = self.reactor.callLater(delay, self._ask)
        return delay

    def _failed(self, failure: Any) -> None:
        self._asking = None
        if not self.running:
            return
        self._reason = describe_error(failure.value)
        delay = self._again()
        problem = failure.type.__name__
        if problem != self._logged:
            self._logged = problem
            log.warn("cannot ask the Redis at {address} what it is ({error}); trying again with backoff",
                     address=format_address(self.address), error=self._reason)
        else:
            log.debug("asking the Redis at {address} failed again ({error}); next in {delay:.1f}s",
                      address=format_address(self.address), error=self._reason, delay=delay)
