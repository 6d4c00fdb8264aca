"""The classic Redis event bus: one dedicated subscriber connection doing
``PSUBSCRIBE <exec_bus>/*/*/*`` and ``PSUBSCRIBE <notif_bus>/*``, every
``pmessage`` handed to :meth:`Router.classic_bytes` as (channel, raw bytes).

Fault handling (PROTOCOL.md section 5), one connection at a time:

* An attempt is connect (``redis_connect_timeout``), AUTH/SELECT/CLIENT
  SETNAME, PSUBSCRIBE; the handshake stage has the same timeout.  A failed
  attempt is closed before the next one is scheduled, and a new attempt is
  only started when no connection (attempted or established) exists: the bus
  never holds two subscriber connections.
* Retries back off 0.5 s doubling to 8 s, each delay scaled by a jitter
  factor in [0.75, 1] (the jitter source is injectable).  A loss after a
  successful subscription starts again at 0.5 s.
* "Delivery resumes within 2 s of Redis coming back", with a cap of 8 s: when
  the last attempt failed because nothing answered (refused, unreachable,
  TCP timeout) and the next attempt is more than ``probe_interval`` (1 s)
  away, the bus sends a cheap TCP probe every second: a bare connect, closed
  at once, with no command.  When a probe connects, the pending attempt runs
  now.  Full attempts (AUTH, SUBSCRIBE) still follow the backoff, so Redis is
  never hammered; when Redis answers but refuses (wrong password, a timeout
  in the handshake, an error reply), no probe runs and the plain backoff
  applies.  Recovery after an outage therefore takes at most about one probe
  interval plus one handshake.
* While subscribed, a PING every ``ping_interval`` seconds must be answered
  within ``ping_timeout`` or the connection is aborted and replaced (a dead
  half-open connection otherwise looks healthy forever).
* Each state change is logged once: unavailable (and again only if the kind
  of failure changes), connected and subscribed, lost.  Retries in between
  log at debug.  No password or URL credentials are ever logged.
"""

from __future__ import annotations

import random
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..config import Settings
from ..core.channels import Layout
from ..core.router import Router
from ..stats import Stats
from . import IEventBus
from .redis_client import Connection, RedisAddress, RedisPublisher, describe_error
from .resp import RedisError, RedisProtocol, handshake

__all__ = ["RedisBus", "RedisPublisher", "RedisAddress"]

log = Logger()

BACKOFF_START = 0.5
BACKOFF_MAX = 8.0
JITTER = 0.25  # a delay is scaled by a factor in [1 - JITTER, 1]
PROBE_INTERVAL = 1.0
PING_INTERVAL = 15.0
PING_TIMEOUT = 10.0
AUTH_ERRORS = ("WRONGPASS", "NOAUTH", "NOPERM", "ERR AUTH", "ERR INVALID PASSWORD", "ERR CLIENT SENT AUTH")


Connector = Callable[[RedisProtocol], Deferred[RedisProtocol]]

_QUIET_PROBE = Factory.forProtocol(Protocol)
_QUIET_PROBE.noisy = False  # no "Starting factory" line per probe


def _auth_refused(exc: BaseException) -> bool:
    return isinstance(exc, RedisError) and str(exc).upper().startswith(AUTH_ERRORS)


@implementer(IEventBus)
class RedisBus(Service):
    kind = "redis"
    name = "redis-bus"

    def __init__(self, settings: Settings, router: Router, reactor: Any, stats: Stats, *,
                 clock: Any = None, jitter: Callable[[], float] = random.random,
                 connector: Connector | None = None, probe_interval: float = PROBE_INTERVAL,
                 ping_interval: float = PING_INTERVAL, ping_timeout: float = PING_TIMEOUT) -> None:
        self.address = RedisAddress.from_settings(settings)
        self.patterns = Layout(settings.execution_event_bus_name, settings.notification_event_bus_name).classic_patterns()
        self.router = router
        self.reactor = reactor
        self.clock = clock or reactor
        self.stats = stats
        self.jitter = jitter
        self.probe_interval = probe_interval
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self._connector: Connector = connector or (lambda proto: self.address.connect(self.reactor, proto))
        self.publisher = RedisPublisher(self.address, reactor)
        self.state = "stopped"  # stopped, connecting, subscribed, waiting
        self._reason = "redis bus not started"
        self._conn: Connection | None = None  # the one subscriber connection, attempted or established
        self._connecting: Deferred[Any] | None = None
        self._probing: Deferred[Any] | None = None
        self._timers: dict[str, IDelayedCall] = {}
        self._delay = BACKOFF_START
        self._failures = 0
        self._logged_problem = ""
        self._subscribed_once = False

    # -- IEventBus -------------------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        return (True, "") if self.state == "subscribed" else (False, self._reason)

    def describe(self) -> str:
        return f"redis {self.address} (PSUBSCRIBE {' '.join(self.patterns)})"

    def producer(self) -> tuple[RedisPublisher, bool]:
        return self.publisher, False

    def publish(self, channel: str, data: bytes) -> Deferred[int]:
        return self.publisher.publish(channel, data)

    # -- lifecycle -------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._reason = f"redis bus connecting to {self.address}"
        self._connect()

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        self.state = "stopped"
        self._reason = "redis bus stopped"
        conn, self._conn = self._conn, None  # first: callbacks of what is cancelled now see it gone
        pending = (self._connecting, self._probing)
        self._connecting = self._probing = None
        for name in list(self._timers):
            self._cancel(name)
        for attempt in pending:
            if attempt is not None and not attempt.called:
                attempt.cancel()
        closing = [self.publisher.close()]
        if conn is not None:
            closing.append(conn.abandon("stopped"))
        return DeferredList(closing).addCallback(lambda _: None)

    # -- one attempt -----------------------------------------------------------

    def _connect(self) -> None:
        self._cancel("retry")
        self._cancel("probe")
        if self._probing is not None:
            self._probing.cancel()
        if not self.running or self._conn is not None:
            return
        conn = Connection(self.router.classic_bytes)
        self._conn = conn
        self.state = "connecting"
        self._attempt(conn)

    @inlineCallbacks
    def _attempt(self, conn: Connection) -> Any:
        stage = "connect"
        try:
            self._connecting = self._connector(conn)
            yield self._connecting
            self._connecting = None
            stage = "handshake"
            self._later("handshake", self.address.timeout, self._abort, conn,
                        f"no answer within {self.address.timeout:g}s")
            yield handshake(conn, self.address.username, self.address.password, self.address.db, "autogpt-ws-bus")
            yield conn.subscribe("PSUBSCRIBE", self.patterns)
        except Exception as exc:
            self._cancel("handshake")
            if conn is self._conn:
                self._attempt_failed(conn, stage, exc)
            else:
                conn.abandon("superseded")
            return
        self._cancel("handshake")
        if conn is not self._conn:  # stopped meanwhile
            conn.abandon("stopped")
            return
        self._subscribed(conn)

    def _attempt_failed(self, conn: Connection, stage: str, exc: Exception) -> None:
        self._conn = None
        self._connecting = None
        conn.abandon()
        self._failures += 1
        if _auth_refused(exc):
            problem, reason = "auth", f"authentication refused by Redis: {exc}"
        elif isinstance(exc, RedisError):
            problem, reason = "refused", f"Redis answered with an error: {exc}"
        elif conn.abort_reason:
            problem, reason = "timeout", conn.abort_reason
        elif stage == "connect" and isinstance(exc, ConnectError):
            problem, reason = "unreachable", describe_error(exc)
        else:
            problem, reason = "lost", f"connection lost during the handshake: {describe_error(exc)}"
        self._reason = f"redis bus unavailable at {self.address}: {reason}"
        delay = self._schedule(probe=problem == "unreachable")
        if problem != self._logged_problem:
            self._logged_problem = problem
            log.warn("redis bus unavailable at {address}: {reason}; retrying with backoff",
                     address=str(self.address), reason=reason, problem=problem)
        else:
            log.debug("redis bus attempt {attempt} failed: {reason}; next in {delay:.2f}s",
                      attempt=self._failures, reason=reason, delay=delay)

    def _subscribed(self, conn: Connection) -> None:
        self.state = "subscribed"
        self._reason = ""
        if self._subscribed_once:
            self.stats.bus_reconnects += 1
        self._subscribed_once = True
        log.info("redis bus connected and subscribed to {patterns} at {address}",
                 patterns=" ".join(self.patterns), address=str(self.address), failed_attempts=self._failures)
        self._delay = BACKOFF_START
        self._failures = 0
        self._logged_problem = ""
        conn.when_lost(lambda reason: self._lost(reason, conn))
        if self.ping_interval > 0:
            self._later("ping", self.ping_interval, self._ping, conn)

    def _lost(self, reason: Failure, conn: Connection) -> None:
        if conn is not self._conn:
            return
        self._conn = None
        self._cancel("ping")
        self._cancel("pong")
        why = conn.abort_reason or reason.getErrorMessage().rstrip(".")
        self._reason = f"redis bus lost its connection to {self.address}: {why}"
        self._logged_problem = "lost"
        log.warn("redis bus lost connection to {address}: {reason}; reconnecting",
                 address=str(self.address), reason=why)
        self._schedule(probe=False)

    # -- timers ----------------------------------------------------------------

    def _schedule(self, probe: bool) -> float:
        """Schedule the next attempt with backoff; probe meanwhile if asked."""
        if not self.running:
            return 0.0
        self.state = "waiting"
        delay = self._delay * (1.0 - JITTER * self.jitter())
        self._delay = min(self._delay * 2, BACKOFF_MAX)
        self._later("retry", delay, self._connect)
        if probe and delay > self.probe_interval:
            self._later("probe", self.probe_interval, self._probe)
        return delay

    def _probe(self) -> None:
        self._timers.pop("probe", None)
        endpoint = HostnameEndpoint(self.reactor, self.address.host, self.address.port,
                                    timeout=min(self.address.timeout, self.probe_interval))
        self._probing = endpoint.connect(_QUIET_PROBE)

        def answered(proto: Protocol) -> None:
            self._probing = None
            proto.transport.abortConnection()  # type: ignore[union-attr]
            if "retry" in self._timers:
                log.debug("redis bus: {address} accepts connections again", address=str(self.address))
                self._connect()

        def silent(_: Failure) -> None:
            self._probing = None
            retry = self._timers.get("retry")
            if retry is not None and retry.getTime() - self.clock.seconds() > self.probe_interval:
                self._later("probe", self.probe_interval, self._probe)

        self._probing.addCallbacks(answered, silent)

    def _ping(self, conn: Connection) -> None:
        self._timers.pop("ping", None)
        if conn is not self._conn:
            return
        self._later("pong", self.ping_timeout, self._pong_late, conn, conn.reads)

        def pong(_: Any) -> None:
            self._cancel("pong")
            if conn is self._conn:
                self._later("ping", self.ping_interval, self._ping, conn)

        conn.command("PING").addCallbacks(pong, lambda _: None)

    def _pong_late(self, conn: Connection, reads: int) -> None:
        """No answer to PING yet: a dead connection, unless data still
        arrives (the answer waits behind a backlog this server is still
        reading: a busy server must not drop a live subscription)."""
        if conn.reads != reads:
            self._later("pong", self.ping_timeout, self._pong_late, conn, conn.reads)
        else:
            self._abort(conn, f"no reply to PING within {self.ping_timeout:g}s")

    def _abort(self, conn: Connection, reason: str) -> None:
        conn.abort_reason = reason
        conn.abandon()

    def _later(self, name: str, delay: float, f: Callable[..., Any], *args: Any) -> None:
        self._cancel(name)

        def fire() -> None:
            self._timers.pop(name, None)
            f(*args)

        self._timers[name] = self.clock.callLater(delay, fire)

    def _cancel(self, name: str) -> None:
        call = self._timers.pop(name, None)
        if call is not None and call.active():
            call.cancel()

